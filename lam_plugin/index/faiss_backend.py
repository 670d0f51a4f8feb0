"""The FAISS side of the index: building and training it from a factory string, the GPU copy.

FAISS does the work; this module turns its failures into errors that say what to change.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import faiss
import numpy as np
import torch

__all__ = ["gpu_device_id", "min_training_points", "new_index", "to_gpu"]

logger = logging.getLogger(__name__)


def new_index(train_on: np.ndarray, factory: str, metric: str) -> Any:
    """A FAISS index from ``factory`` for ``metric`` (``"l2"``, else inner product),
    trained on ``train_on`` ``[N, D]`` if it needs training."""
    n, dim = train_on.shape
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    try:
        index = faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as err:
        raise ValueError(f"index_factory {factory!r} cannot build an index of dimension {dim}: {err}") from err
    if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
        # a bad value of index_factory, not an argument of the wrong type
        raise ValueError("UncertainIndex keeps the ids itself: remove 'IDMap' from index_factory")
    if not index.is_trained:
        needed = min_training_points(index)
        if n < needed:
            raise ValueError(
                f"index_factory {factory!r} is trained on the first add, which needs at least "
                f"{needed} vectors, got {n}"
            )
        logger.info("training %r on %d vectors", factory, n)
        try:
            index.train(train_on)
        except RuntimeError as err:
            raise ValueError(f"training {factory!r} on {n} vectors failed: {err}") from err
    # IVF indexes reconstruct stored vectors by id only with a direct map; others raise
    with contextlib.suppress(RuntimeError):
        faiss.extract_index_ivf(index).make_direct_map()
    return index


def min_training_points(index: Any) -> int:
    """Fewest training vectors FAISS accepts: the IVF ``nlist`` and the PQ codebook size."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    needed = getattr(inner, "nlist", 1)
    pq = getattr(inner, "pq", None)
    return max(needed, pq.ksub if pq is not None else 1)


def gpu_device_id(device: str | torch.device | None) -> int | None:
    """The CUDA device number of ``device``; ``None`` for the CPU."""
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError(
            f"device={str(device)!r} needs faiss with GPU support (e.g. the faiss-gpu package); "
            f"the installed faiss {faiss.__version__} is CPU-only"
        )
    gpu = 0 if dev.index is None else dev.index
    if faiss.get_num_gpus() <= gpu:
        raise RuntimeError(f"device={str(device)!r}: faiss sees {faiss.get_num_gpus()} CUDA device(s)")
    return gpu


def to_gpu(resources: Any, gpu: int, index: Any, factory: str) -> Any:
    """A copy of the CPU ``index`` (built from ``factory``) on CUDA device ``gpu``."""
    try:
        return faiss.index_cpu_to_gpu(resources, gpu, index)
    except RuntimeError as err:
        raise ValueError(f"faiss cannot move a {factory!r} index to the GPU: {err}") from err
