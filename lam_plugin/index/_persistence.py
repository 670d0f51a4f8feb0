"""Saving and loading :class:`~lam_plugin.index.UncertainIndex`: what goes into the file
(:mod:`lam_plugin.index.storage` has the format) and the checks on what comes out of it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from ._adding import install

if TYPE_CHECKING:
    from .uncertain_index import PosteriorLike, UncertainIndex

__all__ = ["check_config", "check_fingerprint", "file_config", "file_tensors", "restore"]

logger = logging.getLogger(__name__)


def file_tensors(index: UncertainIndex) -> dict[str, np.ndarray]:
    """The tensors of the file: the serialised FAISS index and the per-item arrays of
    :class:`~lam_plugin.index.items.ItemStore` (ids; variances, their scales and sums,
    or samples)."""
    return {"faiss_index": faiss.serialize_index(index._index), **index._items.tensors()}


def file_config(index: UncertainIndex) -> dict[str, Any]:
    """The configuration of the file: the constructor arguments :meth:`UncertainIndex.load`
    passes back, and the dimension."""
    return {
        "metric": index.metric,
        "index_factory": index.index_factory,
        "n_samples": index.n_samples,
        "batch_size": index.batch_size,
        "variance": index.variance,
        "variance_dtype": index.variance_dtype,
        "train_size": index.train_size,
        "seed": index.seed,
        "dim": index._dim,
    }


def check_config(path: Path, config: dict[str, Any]) -> int:
    """Refuse a file configuration without exactly the entries of :func:`file_config`;
    returns its dimension, taken out of ``config`` (the rest: the constructor's arguments)."""
    expected = {"metric", "index_factory", "n_samples", "batch_size", "variance", "variance_dtype", "train_size", "seed"}
    missing, unknown = sorted((expected | {"dim"}) - set(config)), sorted(set(config) - expected - {"dim"})
    if missing or unknown:
        raise ValueError(f"{path} is inconsistent: its configuration lacks {missing} and has unknown entries {unknown}")
    dim = config.pop("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{path} is inconsistent: dimension {dim!r}")
    return dim


def check_fingerprint(path: Path, posterior: PosteriorLike | None, stored: str | None) -> None:
    """Refuse a ``posterior`` whose fingerprint differs from the ``stored`` one of ``path``
    (a file built without a posterior is accepted with a warning)."""
    if posterior is None:
        return
    given = str(posterior.fingerprint)
    if stored is None:
        logger.warning("%s was built without a posterior; its fingerprint cannot be checked", path)
    elif given != stored:
        raise ValueError(
            f"the posterior does not match the one {path} was built with "
            f"(fingerprint {given!r}, stored {stored!r})"
        )


def restore(
    index: UncertainIndex,
    path: Path,
    tensors: dict[str, np.ndarray],
    dim: int,
    stored: str | None,
    digest: str | None = None,
) -> None:
    """Fill the new, empty ``index`` with the ``tensors`` read from ``path``, checked to
    agree with each other and with ``dim``; ``stored`` is the file's posterior fingerprint,
    ``digest`` the trained state's where the caller knows it (see :func:`install`)."""
    try:
        faiss_index = faiss.deserialize_index(tensors["faiss_index"])
    except RuntimeError as err:
        raise ValueError(f"{path}: the FAISS index cannot be read: {err}") from err
    index._items.restore(tensors, dim, path)
    metric = faiss.METRIC_L2 if index.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if faiss_index.metric_type != metric:
        names = {faiss.METRIC_L2: "L2", faiss.METRIC_INNER_PRODUCT: "inner product"}
        kind = names.get(faiss_index.metric_type, f"type {faiss_index.metric_type}")
        raise ValueError(f"{path} is inconsistent: metric {index.metric!r}, a FAISS index of metric {kind}")
    if faiss_index.d != dim or faiss_index.ntotal != len(index._items):
        raise ValueError(f"{path} is inconsistent: {faiss_index.ntotal} vectors of dimension {faiss_index.d}, "
                         f"{len(index._items)} items of dimension {dim}")
    install(index, faiss_index, digest)
    index._fingerprint = stored if stored is not None else index._fingerprint
    if index._gpu is not None and faiss_index.ntotal:
        index._gpu_index = index._gpu.copy(faiss_index, index.index_factory)
