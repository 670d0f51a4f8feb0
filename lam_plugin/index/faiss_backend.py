"""The FAISS side of the index: building and training it from a factory string, removing
vectors from it, the GPU copy on one GPU or on all of them.

FAISS does the work; this module turns its failures into errors that say what to change.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any

import faiss
import numpy as np
import torch

__all__ = [
    "GpuPlacement",
    "check_removable",
    "copy_nprobe",
    "gpu_placement",
    "min_training_points",
    "new_index",
    "remove_rows",
    "trained_digest",
    "training_size",
]

logger = logging.getLogger(__name__)


def new_index(train_on: np.ndarray, factory: str, metric: str) -> Any:
    """A FAISS index from ``factory`` for ``metric`` (``"l2"``, else inner product),
    trained on ``train_on`` ``[N, D]`` if it needs training."""
    n, dim = train_on.shape
    index = _build(factory, dim, metric)
    if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
        # a bad value of index_factory, not an argument of the wrong type
        raise ValueError("UncertainIndex keeps the ids itself: remove 'IDMap' from index_factory")
    _check_geometry(index, factory, metric)
    if not index.is_trained:
        needed = min_training_points(index)
        if n < needed:
            raise ValueError(
                f"training index_factory {factory!r} needs at least {needed} vectors, got {n} "
                "(the first add's items up to train_size, or the items given to train())"
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


def training_size(factory: str, dim: int, metric: str) -> int | None:
    """Items an index of ``factory`` is trained on by default: ``None`` when it needs no
    training, else ``max(10_000, 40 k)`` for ``k`` the largest number of centroids its
    training finds (IVF ``nlist``, PQ ``2^nbits``): FAISS asks for 39 points per centroid."""
    try:
        index = _build(factory, dim, metric)
    except ValueError:
        return None  # an unusable factory string is reported when the index is built
    return None if index.is_trained else max(10_000, 40 * min_training_points(index))


def min_training_points(index: Any) -> int:
    """Fewest training vectors FAISS accepts: the IVF ``nlist`` and the PQ codebook size
    (of the index, the index a pre-transform wraps, or an HNSW index's storage)."""
    counts = [1]
    for part in _parts(index):
        counts.append(getattr(part, "nlist", 1))
        pq = getattr(part, "pq", None)
        counts.append(pq.ksub if pq is not None else 1)
    return max(counts)


def check_removable(index: Any, factory: str) -> None:
    """Refuse an index FAISS cannot remove vectors from in the way :func:`remove_rows` needs."""
    parts = _parts(index)
    *outer, inner = parts
    if all(isinstance(part, faiss.IndexPreTransform) for part in outer) and (
        isinstance(inner, faiss.IndexFlatCodes)
        or (
            isinstance(inner, faiss.IndexIVF)
            and inner.invlists is not None
            and isinstance(faiss.downcast_InvertedLists(inner.invlists), faiss.ArrayInvertedLists)
        )
    ):
        return
    raise ValueError(
        f"faiss cannot remove items from a {factory!r} index "
        f"({next(type(p).__name__ for p in parts if not isinstance(p, faiss.IndexPreTransform))}); "
        "use a Flat, PQ, SQ or IVF factory, or build a new index without the items"
    )


def remove_rows(index: Any, rows: np.ndarray) -> None:
    """Remove the vectors at the sorted ``rows`` ``[k]`` of an index that passed
    :func:`check_removable`; the others keep their order as rows ``0 .. N-k-1``.

    Flat-code indexes (Flat, PQ, SQ) renumber their rows that way themselves. IVF lists
    keep the labels vectors were added with, so each label ``l`` left becomes ``l``
    minus the removed rows below it, and the direct map (which cannot remove) is rebuilt.
    """
    ivf = next((part for part in _parts(index) if isinstance(part, faiss.IndexIVF)), None)
    if ivf is not None:
        ivf.make_direct_map(False)
    removed = index.remove_ids(faiss.IDSelectorBatch(rows))
    if ivf is not None:
        lists: Any = ivf.invlists
        for list_no in range(ivf.nlist):
            size = lists.list_size(list_no)
            if size:  # a writable view of the labels FAISS keeps for this list
                labels = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
                labels -= np.searchsorted(rows, labels)
        ivf.make_direct_map(True)
    if removed != len(rows):
        raise RuntimeError(f"faiss removed {removed} of {len(rows)} vectors")


def trained_digest(index: Any) -> str:
    """SHA-256 of what training gave ``index``: its serialisation once emptied by ``reset``
    on a copy (quantiser, codebooks, transforms), with the IVF ``nprobe`` set to 1, since
    that is a search parameter. Copying costs the index's memory again for a moment: an
    index digested while empty (just trained) costs nothing."""
    try:
        empty = faiss.clone_index(index)
    except RuntimeError:  # FAISS clones no L2norm transform, say: a copy through its serialisation
        empty = faiss.deserialize_index(faiss.serialize_index(index))
    empty.reset()
    for part in _parts(empty):
        if isinstance(part, faiss.IndexIVF):
            part.nprobe = 1
    return hashlib.sha256(faiss.serialize_index(empty).tobytes()).hexdigest()


def copy_nprobe(src: Any, dst: Any) -> None:
    """Give the IVF part of ``dst`` the ``nprobe`` of ``src``'s (nothing for other types)."""
    ivf = [next((p for p in _parts(index) if isinstance(p, faiss.IndexIVF)), None) for index in (src, dst)]
    if ivf[0] is not None and ivf[1] is not None:
        ivf[1].nprobe = ivf[0].nprobe


def _check_geometry(index: Any, factory: str, metric: str) -> None:
    """Refuse what makes FAISS's distances other than those between the stored means
    (up to quantisation), which the closed-form moments add the variances to: a centring
    transform (PCA, ITQ) under an inner product, where FAISS returns ``(q - m)·(g - m)``,
    and binary codes (LSH), whose distances are Hamming counts."""
    parts = _parts(index)
    if isinstance(parts[-1], faiss.IndexLSH):
        raise ValueError(f"index_factory {factory!r}: LSH distances are Hamming counts, not {metric} distances")
    if metric == "l2":
        return
    for part in parts:
        chain: Any = part.chain if isinstance(part, faiss.IndexPreTransform) else None  # a C++ vector
        for k in range(chain.size() if chain is not None else 0):
            transform = faiss.downcast_VectorTransform(chain.at(k))
            if isinstance(transform, (faiss.PCAMatrix, faiss.ITQTransform)):
                raise ValueError(
                    f"index_factory {factory!r}: {type(transform).__name__} subtracts a mean, so FAISS's "
                    f"inner products are not those of the embeddings under metric={metric!r}; use 'OPQ' or "
                    "'RR' (rotations) to reduce, or metric='l2'"
                )


def _build(factory: str, dim: int, metric: str) -> Any:
    """An empty FAISS index of ``factory``, dimension ``dim``, for ``metric``."""
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    try:
        return faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as err:
        raise ValueError(f"index_factory {factory!r} cannot build an index of dimension {dim}: {err}") from err


def _parts(index: Any) -> list[Any]:
    """``index`` (downcast) and what it wraps: the index of a pre-transform (PCA, OPQ),
    the storage of an HNSW index, recursively."""
    parts = [faiss.downcast_index(index)]
    while True:
        last = parts[-1]
        inner = last.index if isinstance(last, faiss.IndexPreTransform) else getattr(last, "storage", None)
        if inner is None or not isinstance(last, (faiss.IndexPreTransform, faiss.IndexHNSW)):
            return parts
        parts.append(faiss.downcast_index(inner))


class GpuPlacement:
    """Where the GPU copy of the CPU index lives: one CUDA device, or every GPU FAISS sees,
    each holding all vectors (replicated: ``faiss.IndexReplicas``, searches split by
    query) or a slice of them (sharded: ``faiss.IndexShards``, for a gallery larger than
    one GPU's memory), placed by FAISS's own ``index_cpu_to_all_gpus``.

    Args:
        gpu: the device number, or ``None`` for all GPUs.
        shard: with all GPUs, shard the vectors instead of replicating them.
    """

    def __init__(self, gpu: int | None, shard: bool) -> None:
        self.gpu, self.shard = gpu, shard
        self._resources = faiss.StandardGpuResources() if gpu is not None else None

    @property
    def label(self) -> str:
        """``"cuda:i"``, ``"cuda:all"`` (replicated) or ``"cuda:all (sharded)"``."""
        return f"cuda:{self.gpu}" if self.gpu is not None else "cuda:all" + (" (sharded)" if self.shard else "")

    def update(self, copy: Any, index: Any, factory: str, added: np.ndarray) -> Any:
        """The GPU copy once the means ``added`` ``[B, D]`` went into the CPU ``index``:
        ``copy`` taking them itself (FAISS numbers them on from its ``ntotal``, as the CPU
        index does), or a new copy where there is none yet. ``None`` (copied at the next
        search, once for a whole streamed add) where FAISS's copy takes one add only: a
        Flat index sharded over GPUs, whose ``IndexShards`` numbers a single pass."""
        if self.gpu is None and self.shard and isinstance(_parts(index)[-1], faiss.IndexFlat):
            return None
        if copy is None:
            return self.copy(index, factory)
        copy.add(added)
        return copy

    def copy(self, index: Any, factory: str) -> Any:
        """A GPU copy of the CPU ``index`` (built from ``factory``), made anew after a
        removal or a merge; adds go through :meth:`update`."""
        try:
            if self.gpu is not None:
                assert self._resources is not None
                return faiss.index_cpu_to_gpu(self._resources, self.gpu, index)
            options = faiss.GpuMultipleClonerOptions()
            options.shard = self.shard
            return faiss.index_cpu_to_all_gpus(index, co=options)
        except RuntimeError as err:
            raise ValueError(f"faiss cannot move a {factory!r} index to {self.label}: {err}") from err


def gpu_placement(device: str | torch.device | None, shard: bool = False) -> GpuPlacement | None:
    """The placement of ``device``: ``None`` for the CPU, else one GPU (``"cuda"``,
    ``"cuda:i"``) or all of them (``"cuda:all"``, sharded if ``shard``)."""
    if isinstance(device, str) and device.strip() == "cuda:all":
        _check_gpus(device, 0)
        return GpuPlacement(None, shard)
    if shard:
        raise ValueError(f"gpu_shards=True needs device='cuda:all', got device={device!r}")
    gpu = gpu_device_id(device)
    return None if gpu is None else GpuPlacement(gpu, False)


def gpu_device_id(device: str | torch.device | None) -> int | None:
    """The CUDA device number of ``device``; ``None`` for the CPU."""
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise ValueError(f"device must be 'cpu', 'cuda[:i]' or 'cuda:all', got {device!r}")
    gpu = 0 if dev.index is None else dev.index
    _check_gpus(device, gpu)
    return gpu


def _check_gpus(device: str | torch.device, gpu: int) -> None:
    """Refuse a faiss without GPU support, or one that sees no device number ``gpu``."""
    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError(
            f"device={str(device)!r} needs faiss with GPU support (e.g. the faiss-gpu package); "
            f"the installed faiss {faiss.__version__} is CPU-only"
        )
    if faiss.get_num_gpus() <= gpu:
        raise RuntimeError(f"device={str(device)!r}: faiss sees {faiss.get_num_gpus()} CUDA device(s)")
