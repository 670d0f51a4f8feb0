"""The search path of :class:`~lam_plugin.index.UncertainIndex`: the FAISS candidates of
each query, the moments of their distances, re-ranking and filtering, and the order
probabilities (the maths: :mod:`lam_plugin.index` and :mod:`lam_plugin.index.moments`).

Shapes: queries ``q`` ``[Qc, D]`` with variances ``a`` ``[Qc, D]`` (and, in ``"mc"`` mode,
samples ``[Qc, n, D]``), ``c`` FAISS candidates per query of which ``k`` are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import faiss
import numpy as np

from ..arguments import positive_int
from . import moments
from .result import confidence_bound, normal_cdf, prob_within

if TYPE_CHECKING:
    from .uncertain_index import UncertainIndex

__all__ = ["Rerank", "SearchOptions", "check_search_arguments", "check_searchable", "search_rows", "too_many"]

#: Bound on the floats of one ``[queries, candidates, D]`` work array of a search.
_CHUNK_FLOATS = 1 << 24
_GPU_MAX_K = 2048  # the most neighbours FAISS's GPU indexes return per query

Rerank = Literal["expected", "lcb"]


@dataclass(frozen=True)
class SearchOptions:
    """The checked arguments of one :meth:`UncertainIndex.search`: ``candidates`` (``c``)
    FAISS neighbours per query, of which ``k`` are kept."""

    k: int
    candidates: int
    return_probabilities: bool
    threshold: float | None
    min_prob: float | None
    rerank: Rerank | None
    z: float


def check_search_arguments(
    k: int,
    candidates: int | None,
    threshold: float | None,
    min_prob: float | None,
    rerank: Rerank | None,
    z: float,
) -> tuple[int, int]:
    """``(k, c)``, the kept neighbours and the FAISS candidates per query, after checking
    the arguments of a search that do not depend on the index."""
    k = positive_int(k, "k")
    c = k if candidates is None else positive_int(candidates, "candidates")
    if c < k:
        raise ValueError(f"candidates must be at least k={k}, got {c}")
    if min_prob is not None:
        if threshold is None:
            raise ValueError("min_prob needs a threshold")
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
    if threshold is not None and not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if rerank not in (None, "expected", "lcb"):
        raise ValueError(f"rerank must be None, 'expected' or 'lcb', got {rerank!r}")
    if rerank == "lcb" and not np.isfinite(z):
        raise ValueError(f"z must be finite, got {z}")
    return k, c


def too_many(k: int, c: int, n_items: int) -> str:
    """The message for ``c`` FAISS candidates (``k`` when not given) over ``n_items`` items."""
    return f"{'k' if c == k else 'candidates'}={c} exceeds the {n_items} items in the index"


def check_searchable(index: UncertainIndex, q: np.ndarray, k: int, c: int) -> None:
    """Check, under the read lock, that ``index`` can give ``c`` candidates of queries ``q`` ``[Q, D]``."""
    n_items = len(index._items)
    if n_items == 0:
        raise ValueError("the index is empty: add items before searching")
    if c > n_items:
        raise ValueError(too_many(k, c, n_items))
    if q.shape[1] != index._dim:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index has dimension {index._dim}")


def search_rows(
    index: UncertainIndex, q: np.ndarray, a: np.ndarray, q_samples: np.ndarray | None, options: SearchOptions
) -> dict[str, np.ndarray]:
    """The arrays of :class:`SearchResult` (but ``query_uncertainty``) of queries ``q``
    ``[Q, D]``, searched in chunks of queries whose ``[Qc, c, D]`` work arrays (``n`` times
    that in ``"mc"`` mode) hold at most about ``_CHUNK_FLOATS`` floats."""
    per_query = options.candidates * q.shape[1] * (index.n_samples if index.variance == "mc" else 1)
    step = max(1, _CHUNK_FLOATS // per_query)
    parts = [
        _search_chunk(
            index,
            q[i : i + step],
            a[i : i + step],
            None if q_samples is None else q_samples[i : i + step],
            options,
        )
        for i in range(0, q.shape[0], step)
    ]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _search_chunk(
    index: UncertainIndex, q: np.ndarray, a: np.ndarray, q_samples: np.ndarray | None, options: SearchOptions
) -> dict[str, np.ndarray]:
    """Search ``q`` ``[Qc, D]`` for ``c`` candidates, keep ``k``; arrays of :class:`SearchResult`."""
    dist, rows = _faiss_search(index, q, options.candidates)
    valid = rows >= 0  # FAISS pads with -1 when it finds fewer than c (e.g. IVF, small nprobe)
    if not valid.all():  # placeholders, padded again at the end
        rows, dist = np.where(valid, rows, 0), np.where(valid, dist, np.float32(0))
    ip = index.metric != "l2"
    expected, variances, d_s = _candidate_moments(index, q, a, q_samples, dist, rows, ip)
    within = None
    if options.threshold is not None and (options.min_prob is not None or options.return_probabilities):
        within = prob_within(expected, variances, options.threshold, index.metric)
        if options.min_prob is not None:
            valid &= within >= options.min_prob
    perm = _kept_order(dist, expected, variances, valid, options, index.metric)
    dist, rows, valid, expected, variances = (_take(perm, x) for x in (dist, rows, valid, expected, variances))
    out: dict[str, np.ndarray] = {
        "ids": np.where(valid, index._items.ids[rows], -1),
        "distances": dist,
        "variances": variances.astype(np.float32, copy=False),
        "expected": expected.astype(np.float32, copy=False),
    }
    if options.return_probabilities:
        kept_d_s = None if d_s is None else _take(perm, d_s)
        out["order_probabilities"] = _order_probabilities(index, q, a, rows, valid, out["expected"], kept_d_s, ip)
        if within is not None:
            out["within_probabilities"] = _take(perm, within).astype(np.float32, copy=False)
    if not valid.all():
        _pad_invalid(out, valid, ip)
    return out


def _candidate_moments(
    index: UncertainIndex,
    q: np.ndarray,
    a: np.ndarray,
    q_samples: np.ndarray | None,
    dist: np.ndarray,
    rows: np.ndarray,
    ip: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(E, Var, d_s)`` of the distance of each query to each candidate ``rows`` ``[Qc, c]``:
    ``E`` and ``Var`` ``[Qc, c]``; ``d_s`` ``[Qc, c, n]``, the sample distances under shared
    weight samples in ``"mc"`` mode (``q_samples`` given), else ``None`` (closed form)."""
    if q_samples is not None:  # "mc" mode
        d_s = moments.sample_distances(index._items.samples(rows), q_samples, ip)
        return d_s.mean(axis=2), d_s.var(axis=2, ddof=1), d_s
    expected, variances = moments.closed_form(
        q, a, dist, _means(index, rows), index._items.variances(rows), index._items.var_sums(rows), ip
    )
    return expected, variances, None


def _kept_order(
    dist: np.ndarray,
    expected: np.ndarray,
    variances: np.ndarray,
    valid: np.ndarray,
    options: SearchOptions,
    metric: str,
) -> np.ndarray | None:
    """``[Qc, k]`` positions among the ``c`` candidates of each query to keep, in order:
    valid ones first, then nearest first by the distance of means, the expected distance
    (``rerank="expected"``) or the confidence bound (``rerank="lcb"``), ties in FAISS
    order. ``None`` when FAISS's order is kept as it is."""
    if options.rerank is None and options.candidates <= options.k and valid.all():
        return None
    ip = metric != "l2"
    if options.rerank == "expected":
        key = -expected if ip else expected
    elif options.rerank == "lcb":
        key = confidence_bound(expected, variances, options.z, metric)
        key = -key if ip else key
    else:
        key = -dist if ip else dist
    return np.lexsort((key, ~valid), axis=1)[:, : options.k]  # valid first, then by key (stable)


def _take(perm: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """``x`` ``[Qc, c, ...]`` in the kept order ``perm`` ``[Qc, k]`` (see :func:`_kept_order`), ``[Qc, k, ...]``."""
    if perm is None:
        return x
    return np.take_along_axis(x, perm.reshape(*perm.shape, *(1,) * (x.ndim - 2)), axis=1)


def _order_probabilities(
    index: UncertainIndex,
    q: np.ndarray,
    a: np.ndarray,
    rows: np.ndarray,
    valid: np.ndarray,
    expected: np.ndarray,
    d_s: np.ndarray | None,
    ip: bool,
) -> np.ndarray:
    """``[Qc, k-1]`` ``P(neighbour j nearer than j+1) = Phi(-E[D] / sqrt(Var[D]))`` for
    ``D = d_j^2 - d_(j+1)^2`` (ip: ``Phi(E[D] / sqrt(Var[D]))``), from the kept sample
    distances ``d_s`` ``[Qc, k, n]`` in ``"mc"`` mode, else from the closed form; NaN
    where either neighbour is an empty slot."""
    if d_s is not None:  # "mc" mode
        d_mean, d_var = moments.order_samples(d_s)
    else:
        d_mean, d_var = moments.order_closed_form(q, a, _means(index, rows), index._items.variances(rows), expected, ip)
    order = normal_cdf(d_mean if ip else -d_mean, d_var)
    order[~(valid[:, :-1] & valid[:, 1:])] = np.nan
    return order


def _pad_invalid(out: dict[str, np.ndarray], valid: np.ndarray, ip: bool) -> None:
    """Mark the empty slots (``valid`` false) of ``out`` in place: infinitely far
    distances, NaN variances and probabilities of being within the threshold."""
    pad = -np.inf if ip else np.inf
    for name in ("distances", "expected"):
        out[name] = np.where(valid, out[name], np.float32(pad))
    for name in ("variances", "within_probabilities"):
        if name in out:
            out[name] = np.where(valid, out[name], np.float32(np.nan))


def _means(index: UncertainIndex, rows: np.ndarray) -> np.ndarray:
    """``[..., D]`` stored means of index rows ``rows`` (a new array)."""
    faiss_index = index._index
    dim: int = faiss_index.d
    if index._flat:  # a view of IndexFlat's storage: no OpenMP region for a small gather
        return faiss.rev_swig_ptr(faiss_index.get_xb(), faiss_index.ntotal * dim).reshape(-1, dim)[rows]
    return faiss_index.reconstruct_batch(rows.ravel()).reshape(*rows.shape, dim)


def _faiss_search(index: UncertainIndex, q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, rows)``, each ``[Qc, c]``, of FAISS (on the GPU copy where the index
    has a GPU placement, one dropped by an add made again first; on the CPU index for more
    than the 2048 neighbours FAISS's GPU search returns)."""
    if index._gpu is None or c > _GPU_MAX_K:
        return index._index.search(q, c)
    with index._gpu_lock:  # the read lock keeps the CPU index as it is meanwhile
        if index._gpu_index is None:
            index._gpu_index = index._gpu.copy(index._index, index.index_factory)
        return index._gpu_index.search(q, c)
