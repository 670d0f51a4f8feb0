"""The add path of :class:`~lam_plugin.index.UncertainIndex`: items streamed batch by
batch into the FAISS index (means) and the item store (ids, variances or samples), and
the training of an index that needs it.

An index that needs training (IVF, PQ, SQ, ..., or variances stored in a few bits) and
is not trained yet is trained by the first add on ``train_size`` items (default
:func:`training_items`): drawn at random from the data where it can be sampled (a
tensor, a dict of tensors, a DataLoader whose default sampler yields all of its map-style
dataset, of more than twice that many items; :func:`drawn`), else its first items, held in a buffer until it is
full or the add ends. Memory: one batch of predictions at a time, plus that buffer.
:func:`train` trains on items given apart instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import faiss
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset

from ..prediction import Prediction
from ._embedding import check, check_mean, predictions
from .faiss_backend import new_index, trained_digest, training_size
from .inputs import as_ids

if TYPE_CHECKING:
    from .uncertain_index import UncertainIndex

__all__ = ["add", "install", "refresh", "train", "training_items"]

logger = logging.getLogger(__name__)

#: Checked items: means ``[B, D]``, variances ``[B, D]``, samples ``[B, n, D]`` (``"mc"``)
#: or ``None``, user ids ``[B]`` or ``None`` (default ids).
Chunk: TypeAlias = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


class _TrainingBuffer:
    """The first ``limit`` items of an add to an index that needs training."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size, self.chunks = limit, 0, list[Chunk]()

    def take(self, chunk: Chunk) -> Chunk | None:
        """Keep the first items of ``chunk`` that fit; the rest of it (``None`` if none)."""
        n = chunk[0].shape[0]
        if self.chunks and chunk[0].shape[1] != self.chunks[0][0].shape[1]:
            raise ValueError(f"data has dimension {chunk[0].shape[1]}, the items before have {self.chunks[0][0].shape[1]}")
        k = min(n, self.limit - self.size)
        self.chunks.append(_rows(chunk, 0, k))
        self.size += k
        return _rows(chunk, k, n) if k < n else None


def add(index: UncertainIndex, data: Any, ids: Sequence[int] | np.ndarray | Tensor | None) -> None:
    """Add ``data`` (a prediction, a tensor, a dict of tensors or an iterable of batches)
    under ``ids`` (default: after the largest id), batch by batch."""
    given = None if ids is None else as_ids(ids)
    if given is not None:
        if isinstance(data, (Prediction, Tensor, Mapping)) and len(given) != _length(data):
            raise ValueError(f"ids must have shape ({_length(data)},), got {given.shape}")
        with index._lock.write():
            index._items.check_new(given)  # checked again batch by batch; fail before embedding
    done, before = 0, len(index)
    buffer: _TrainingBuffer | None = None
    try:
        for pred in predictions(index, data, "data"):
            mean, var, samples, _ = check(index, pred, "data")
            n = mean.shape[0]
            if given is not None and done + n > len(given):
                raise ValueError(f"ids has {len(given)} entries, data has more items")
            chunk: Chunk = (mean, var, samples, None if given is None else given[done : done + n])
            done += n
            if done == n and (index._index is None or index._items.needs_training):  # the first batch, untrained
                buffer = _prepare_training(index, data, training_items(index, mean.shape[1]))
            rest: Chunk | None = chunk if buffer is None else buffer.take(chunk)
            if buffer is not None and buffer.size >= buffer.limit:
                _train_and_add(index, buffer)
                buffer = None
            if rest is not None:
                add_rows(index, *rest)
        if done == 0:
            raise ValueError("data is empty")
        if given is not None and done != len(given):
            raise ValueError(f"ids has {len(given)} entries, data has {done} items")
        if buffer is not None:
            _train_and_add(index, buffer)
    finally:
        if len(index) > before:
            logger.info("added %d items, the index holds %d", len(index) - before, len(index))


def _prepare_training(index: UncertainIndex, data: Any, default: int | None) -> _TrainingBuffer | None:
    """Before the first batch of an add to an untrained index (``default``: the items it
    trains on by default, ``None`` when it needs no training): train it on ``train_size``
    items drawn at random from ``data`` where :func:`drawn` can, else return the buffer of
    the first items to train it on."""
    if default is None:
        return None
    size = index.train_size or default
    sample = drawn(data, size, index.seed, index.batch_size)
    if sample is None:
        return _TrainingBuffer(size)
    logger.info("training on %d items drawn at random (seed %d) from the data being added", size, index.seed)
    train(index, sample, fresh=False)
    return None


def drawn(data: Any, size: int, seed: int, batch_size: int) -> Any | None:
    """``size`` items of ``data`` drawn uniformly without replacement (seeded), in their
    order, to train on: where ``data`` is a tensor, a dict of tensors or a DataLoader that
    yields all of its map-style dataset (:func:`_yields_whole_dataset`), of more than
    ``2 size`` items. ``None`` otherwise (an iterator, a
    smaller gallery): the first items train the index then. A sorted gallery (an image
    folder, class by class) would otherwise train IVF lists on its first classes only.
    The drawn items are embedded once more when added."""
    n = _items_in(data)
    if n is None or n <= 2 * size:
        return None
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    if isinstance(data, Tensor):
        return data[torch.from_numpy(rows)]
    if isinstance(data, Mapping):
        return {k: v[torch.from_numpy(rows)] if isinstance(v, Tensor) else v for k, v in data.items()}
    loader: DataLoader = data
    return DataLoader(
        Subset(loader.dataset, rows.tolist()), batch_size=loader.batch_size or batch_size,
        collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
    )


def _items_in(data: Any) -> int | None:
    """How many items ``data`` holds, where :func:`drawn` can sample it: a tensor, a dict
    of tensors of one length, a DataLoader that yields all of a sized map-style dataset."""
    if isinstance(data, Tensor):
        return int(data.shape[0]) if data.ndim else None
    if isinstance(data, Mapping):
        lengths = {int(v.shape[0]) for v in data.values() if isinstance(v, Tensor) and v.ndim}
        return lengths.pop() if len(lengths) == 1 else None
    if isinstance(data, DataLoader) and _yields_whole_dataset(data):
        return len(data.dataset)  # type: ignore[arg-type]
    return None


def _yields_whole_dataset(loader: DataLoader) -> bool:
    """Whether ``loader`` yields every item of a sized map-style dataset once: its default
    sequential or shuffling sampler (without replacement) in batches that keep the last,
    so a draw from the dataset is a draw from what is added (not a custom or distributed
    sampler's part)."""
    dataset, sampler, batches = loader.dataset, loader.sampler, loader.batch_sampler
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return False
    if type(batches) is not BatchSampler or batches.sampler is not sampler or batches.drop_last:
        return False
    if type(sampler) is SequentialSampler:
        return sampler.data_source is dataset
    return (
        type(sampler) is RandomSampler
        and sampler.data_source is dataset
        and not sampler.replacement
        and sampler.num_samples == len(dataset)
    )


def train(index: UncertainIndex, data: Any, *, fresh: bool = True) -> None:
    """Train the empty ``index``'s FAISS index on the means of all of ``data`` (and its
    variances quantiser, if any, on their variances). ``fresh``: refuse a trained index
    (``train``); else (an add's drawn sample) keep what another add trained meanwhile."""
    if fresh and index._index is not None:
        raise ValueError(_trained_already(index))
    rows = [_training_rows(index, pred) for pred in predictions(index, data, "data")]
    if not rows:
        raise ValueError("data is empty")
    dims = sorted({mean.shape[1] for mean, _ in rows})
    if len(dims) > 1:
        raise ValueError(f"data has items of dimensions {dims}")
    _train(index, np.concatenate([mean for mean, _ in rows]), [var for _, var in rows], fresh=fresh)
    logger.info("trained %r on %d items", index.index_factory, sum(mean.shape[0] for mean, _ in rows))


def training_items(index: UncertainIndex, dim: int) -> int | None:
    """Items the first add buffers to train ``index`` on by default: ``None`` when nothing
    needs training, else the most of :func:`~lam_plugin.index.faiss_backend.training_size`
    (``max(10_000, 40 k)`` for ``k`` IVF lists or PQ centroids) and, for variances stored
    in a few bits, 10,000 (at least 39 items per level of 8 bits)."""
    sizes = [10_000] if index._items.needs_training else []
    if index._index is None:
        sizes.append(training_size(index.index_factory, dim, index.metric) or 0)
    return max(sizes) or None


def add_rows(
    index: UncertainIndex, mean: np.ndarray, var: np.ndarray, samples: np.ndarray | None, new_ids: np.ndarray | None
) -> None:
    """Index checked items: means ``[B, D]``, variances ``[B, D]``, samples ``[B, n, D]``
    (``"mc"`` mode), under ``new_ids`` ``[B]`` (default: after the largest id). Everything
    is checked before anything changes."""
    with index._lock.write():
        if index._dim is not None and mean.shape[1] != index._dim:
            raise ValueError(f"data has dimension {mean.shape[1]}, the index has dimension {index._dim}")
        if new_ids is None:
            new_ids = index._items.next_ids(mean.shape[0])
        else:
            index._items.check_new(new_ids)
        if index._index is None:
            _install_trained(index, new_index(mean, index.index_factory, index.metric))
        if index._items.needs_training:  # a first add of fewer items than train_size
            index._items.train(var)
        index._index.add(mean)
        index._items.append(new_ids, var, samples)
        if index._gpu is not None:  # the GPU copy takes the same means
            _follow_on_gpu(index, mean)
        logger.debug("added %d rows, the index holds %d", mean.shape[0], len(index._items))


def refresh(index: UncertainIndex, what: str) -> None:
    """After a change that adds cannot mirror (``what`` it was: a removal, a merge): copy
    the CPU index to the GPU anew, and say what the index holds."""
    if index._gpu is not None:
        with index._lock.write():
            _follow_on_gpu(index, None)
    logger.info("%s, the index holds %d", what, len(index._items))


def _follow_on_gpu(index: UncertainIndex, added: np.ndarray | None) -> None:
    """Bring the GPU copy in line with the CPU index (under the write lock): the copy takes
    the means ``added`` ``[B, D]``, or, for ``None`` (a change adds cannot mirror), is made
    anew. A copy that fails is dropped, with a warning, never kept stale: the next search
    copies the CPU index, and says why if it cannot."""
    assert index._gpu is not None
    try:
        if added is None:
            index._gpu_index = None
            index._gpu_index = index._gpu.copy(index._index, index.index_factory)
        else:
            index._gpu_index = index._gpu.update(index._gpu_index, index._index, index.index_factory, added)
    except (RuntimeError, ValueError) as err:
        index._gpu_index = None
        logger.warning("the GPU copy could not follow the index (%s); the next search copies it anew", err)


def _install_trained(index: UncertainIndex, trained: Any) -> None:
    """Install the newly trained, empty ``trained`` (under the write lock), with its GPU
    copy made first: an index FAISS cannot place on the GPU is refused before anything
    changes."""
    copy = index._gpu.copy(trained, index.index_factory) if index._gpu is not None else None
    install(index, trained)
    index._gpu_index = copy


def _train_and_add(index: UncertainIndex, buffer: _TrainingBuffer) -> None:
    """Train the index on the buffer's items (unless another add trained it meanwhile)
    and add them; a failed training stores nothing."""
    _train(index, np.concatenate([chunk[0] for chunk in buffer.chunks]), [chunk[1] for chunk in buffer.chunks])
    while buffer.chunks:
        add_rows(index, *buffer.chunks.pop(0))


def _train(index: UncertainIndex, means: np.ndarray, variances: list[np.ndarray], *, fresh: bool = False) -> None:
    """Train what of ``index`` is untrained: its FAISS index on ``means`` ``[n, D]`` and
    its variances quantiser on ``variances`` (``[n_i, D]`` parts). ``fresh`` (``train``):
    refuse an index trained meanwhile; else (``add``) keep what is there."""
    trained = new_index(means, index.index_factory, index.metric) if index._index is None else None
    with index._lock.write():
        if fresh and index._index is not None:
            raise ValueError(_trained_already(index))
        if index._index is None and trained is not None:
            _install_trained(index, trained)
        if index._items.needs_training:
            index._items.train(np.concatenate(variances))


def _training_rows(index: UncertainIndex, pred: Prediction) -> tuple[np.ndarray, np.ndarray]:
    """Means ``[B, D]`` and, where the variances are quantised, variances ``[B, D]`` (else
    ``[B, 0]``) of one prediction of the training data."""
    if index._items.quantizer is None:
        mean = check_mean(index, pred, "data")
        return mean, np.empty((mean.shape[0], 0), dtype=np.float32)
    mean, var, _, _ = check(index, pred, "data")
    return mean, var


def install(index: UncertainIndex, faiss_index: Any, digest: str | None = None) -> None:
    """Make ``faiss_index`` the index's (under the write lock), with the
    :func:`~lam_plugin.index.faiss_backend.trained_digest` of its trained state: ``digest``
    if known, else taken now if the index is empty (cheap), else when first needed."""
    digest = digest or (trained_digest(faiss_index) if faiss_index.ntotal == 0 else None)
    index._index, index._dim, index._trained_digest = faiss_index, faiss_index.d, digest
    index._flat = isinstance(faiss.downcast_index(faiss_index), faiss.IndexFlat)


def _trained_already(index: UncertainIndex) -> str:
    return f"the index is trained already (it holds {len(index)} items): train() prepares a new, empty index"


def _rows(chunk: Chunk, start: int, stop: int) -> Chunk:
    """Items ``start:stop`` of ``chunk``."""
    mean, var, samples, ids = chunk
    part = slice(start, stop)
    return mean[part], var[part], None if samples is None else samples[part], None if ids is None else ids[part]


def _length(data: Prediction | Tensor | Mapping[str, Any]) -> int:
    """Items in a prediction, a tensor batch or a dict batch."""
    if isinstance(data, Prediction):
        return len(data)
    if isinstance(data, Tensor):
        return int(data.shape[0])
    return next(int(v.shape[0]) for v in data.values() if isinstance(v, Tensor))
