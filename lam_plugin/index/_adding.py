"""The add path of :class:`~lam_plugin.index.UncertainIndex`: checked rows into the FAISS
index (means) and beside it (ids, variances or samples), batch by batch or all at once
when the index must first be trained."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import faiss
import numpy as np
from torch import Tensor

from ..prediction import Prediction
from . import _embedding
from .faiss_backend import new_index, to_gpu
from .inputs import as_ids

if TYPE_CHECKING:
    from .uncertain_index import UncertainIndex

__all__ = ["add_batch", "add_rows", "add_stream"]

logger = logging.getLogger(__name__)

#: Checked rows of a chunk: means ``[B, D]``, variances ``[B, D]``, samples ``[B, n, D]`` or ``None``.
Chunk: TypeAlias = tuple[np.ndarray, np.ndarray, np.ndarray | None]
#: User ids given with a chunk (``None``: after the largest id).
ChunkIds: TypeAlias = np.ndarray | None


def add_batch(
    index: UncertainIndex,
    data: Prediction | Tensor | Mapping[str, Any],
    ids: Sequence[int] | np.ndarray | Tensor | None,
) -> None:
    """Add one batch (a prediction, a tensor or a dict of tensors) in one go."""
    add_rows(index, *_embedding.prepare(index, data, "data")[:3], None if ids is None else as_ids(ids, _length(data)))
    _added(index, _length(data))


def add_stream(index: UncertainIndex, data: Any, ids: Sequence[int] | np.ndarray | Tensor | None) -> None:
    """Add an iterable of batches, batch by batch; an index that needs training is
    trained on all of the first add, so its rows wait until the last batch."""
    given = None if ids is None else np.asarray(ids.detach().cpu() if isinstance(ids, Tensor) else ids)
    done, before = 0, len(index)
    pending: list[tuple[Chunk, ChunkIds]] = []
    try:
        for pred in _embedding.predictions(index, data, "data"):
            rows = _embedding.check(index, pred, "data")[:3]
            chunk = None if given is None else as_ids(given[done : done + len(rows[0])], len(rows[0]))
            done += len(rows[0])
            if index._index is None and (pending or _needs_training(index.index_factory, rows[0].shape[1])):
                pending.append((rows, chunk))  # an index that needs training is trained on all of the first add
                continue
            add_rows(index, *rows, chunk)
        if done == 0:
            raise ValueError("data is empty")
        if given is not None and done != len(given):
            raise ValueError(f"ids has {len(given)} entries, data has {done} items")
        if pending:
            (mean, var, samples), chunk = _concat(pending)
            add_rows(index, mean, var, samples, chunk)
    finally:  # the GPU copy holds what was added, even when a later batch fails
        if len(index) > before:
            _added(index, len(index) - before)


def add_rows(
    index: UncertainIndex, mean: np.ndarray, var: np.ndarray, samples: np.ndarray | None, new_ids: np.ndarray | None
) -> None:
    """Index checked rows: means ``[B, D]``, variances ``[B, D]``, samples ``[B, n, D]``
    (``"mc"`` mode), under ``new_ids`` (default: after the largest id)."""
    n = mean.shape[0]
    with index._lock.write():
        if index._dim is not None and mean.shape[1] != index._dim:
            raise ValueError(f"data has dimension {mean.shape[1]}, the index has dimension {index._dim}")
        if new_ids is None:
            start = int(index._ids.max()) + 1 if len(index._ids) else 0
            new_ids = np.arange(start, start + n, dtype=np.int64)
        else:
            clash = new_ids[np.isin(new_ids, index._ids)]
            if clash.size:
                raise ValueError(f"ids already in the index: {clash[:10].tolist()}")
        faiss_index = index._index if index._index is not None else new_index(mean, index.index_factory, index.metric)
        faiss_index.add(mean)
        index._index, index._dim = faiss_index, mean.shape[1]
        index._flat = isinstance(faiss.downcast_index(faiss_index), faiss.IndexFlat)
        index._ids = index._rows["ids"].append(new_ids)
        if index.variance == "mc":
            index._samples = index._rows["samples"].append(samples)  # type: ignore[arg-type]
        else:
            index._var = index._rows["var"].append(var)
            index._var_sum = index._rows["var_sum"].append(var.sum(axis=1))
        logger.debug("added %d rows, the index holds %d", n, len(index._ids))


def _added(index: UncertainIndex, n: int) -> None:
    """After an ``add`` of ``n`` items: refresh the GPU copy once (not per batch of a
    streamed loader) and say what the index holds."""
    if index._gpu_id is not None:
        with index._lock.write():
            index._gpu_index = to_gpu(index._gpu_res, index._gpu_id, index._index, index.index_factory)
    logger.info("added %d items, the index holds %d", n, len(index._ids))


def _length(data: Prediction | Tensor | Mapping[str, Any]) -> int:
    """Items in a prediction, a tensor batch or a dict batch."""
    if isinstance(data, Prediction):
        return len(data)
    if isinstance(data, Tensor):
        return int(data.shape[0])
    return next(int(v.shape[0]) for v in data.values() if isinstance(v, Tensor))


def _needs_training(factory: str, dim: int) -> bool:
    """Whether a FAISS index of ``factory`` must be trained before items are added."""
    try:
        return not faiss.index_factory(dim, factory).is_trained
    except RuntimeError:
        return False  # an unusable factory string is reported when the index is built


def _concat(parts: list[tuple[Chunk, ChunkIds]]) -> tuple[Chunk, ChunkIds]:
    """The rows and ids of several chunks as one."""
    means, variances, samples = zip(*(rows for rows, _ in parts))
    ids = [chunk for _, chunk in parts]
    rows = (
        np.concatenate(means),
        np.concatenate(variances),
        None if samples[0] is None else np.concatenate(samples),
    )
    return rows, None if ids[0] is None else np.concatenate(ids)  # type: ignore[arg-type]
