"""Leave-one-out k-nearest-neighbour search under the Euclidean distance, with
deterministic tie-breaking, shared by retrieval, the AUSC and the ECE."""

from __future__ import annotations

import logging

import numpy as np
import torch

from .inputs import ArrayLike, as_float_array, check_at_least_two, check_k

__all__ = ["knn", "nearest_neighbours"]

logger = logging.getLogger(__name__)

# Number of query-to-item distances held at once by the blocked k-NN search
# (2**22 float64 values = 32 MiB per block, plus the workspace of torch.topk).
_BLOCK_ELEMENTS = 1 << 22


def _smallest_k(dist: torch.Tensor, k: int) -> np.ndarray:
    """Column indices of the ``k`` smallest entries of each row, ordered by (distance, index)."""
    # One extra neighbour tells whether the tie at the k-th distance runs past k
    # (k + 1 <= N always holds: k < N). topk keeps arbitrary members of such a tie;
    # in those rows, keep the lowest indices among the tied entries instead.
    values, candidates = torch.topk(dist, k + 1, dim=1, largest=False)
    surplus = (values[:, k] == values[:, k - 1]).numpy()
    dist_np, threshold_np, idx = dist.numpy(), values[:, k - 1 : k].numpy(), candidates[:, :k].numpy()
    if surplus.any():
        sub, sub_threshold = dist_np[surplus], threshold_np[surplus]
        take = sub < sub_threshold
        ties = sub == sub_threshold
        need = k - take.sum(axis=1, keepdims=True)
        take |= ties & (np.cumsum(ties, axis=1) <= need)
        idx[surplus] = np.nonzero(take)[1].reshape(-1, k)
    idx.sort(axis=1)
    order = np.argsort(np.take_along_axis(dist_np, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def knn(x: np.ndarray, k: int, chunk_size: int | None = None) -> np.ndarray:
    """:func:`nearest_neighbours` of float64 ``x [N, D]`` without its checks (callers make them)."""
    # Hand-written rather than faiss.IndexFlatL2: FAISS computes in float32, leaves
    # the order of tied distances unspecified, and cannot exclude the query itself
    # reliably when it has exact duplicates (self may not come back first).
    n = x.shape[0]
    rows = chunk_size if chunk_size is not None else max(1, _BLOCK_ELEMENTS // n)
    logger.debug("k-NN search: N=%d, D=%d, k=%d, %d queries per block", n, x.shape[1], k, rows)
    items = torch.from_numpy(np.ascontiguousarray(x))
    sq_norms = (items * items).sum(dim=1)
    out = np.empty((n, k), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            # |q - x|^2 - |q|^2 = |x|^2 - 2 q.x: the query's own norm does not change its ranking.
            dist = torch.addmm(sq_norms, items[start:stop], items.T, alpha=-2.0)
            dist[torch.arange(stop - start), torch.arange(start, stop)] = torch.inf  # exclude the query itself
            out[start:stop] = _smallest_k(dist, k)
    return out


def nearest_neighbours(embeddings: ArrayLike, k: int, *, chunk_size: int | None = None) -> np.ndarray:
    """Leave-one-out ``k`` nearest neighbours of every row under the Euclidean distance.

    Args:
        embeddings: ``[N, D]`` embeddings.
        k: neighbours per query, ``1 <= k < N``.
        chunk_size: queries per distance block; by default a block holds about
            ``2**22`` distances (32 MiB), which bounds memory for any ``N``.

    Returns:
        ``[N, k]`` int64 indices into ``embeddings``, nearest first, never the query
        itself. Equal distances are ordered by the smaller index.
    """
    x = as_float_array(embeddings, "embeddings", "[N, D]")
    check_at_least_two(x.shape[0], "embeddings")
    check_k(k, x.shape[0])
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return knn(x, k, chunk_size)
