"""A FAISS nearest-neighbour index that returns each neighbour's distance with its variance.

Every gallery item and every query is a Gaussian embedding: a mean ``mu`` (what FAISS
indexes and searches) and per-dimension variances ``std**2`` (what this module keeps
beside the FAISS index). For a query ``q ~ N(mu_q, diag(a))`` and an independent
neighbour ``g ~ N(mu_g, diag(b))``, with ``delta = mu_q - mu_g``:

* ``metric="l2"``: the returned *distance* is the squared Euclidean distance of the
  means, ``||delta||^2``, exactly what FAISS returns. Its variance and mean are those of
  the random squared distance ``d^2 = ||q - g||^2``::

      E[d^2]   = ||delta||^2 + sum_d (a_d + b_d)
      Var[d^2] = 2 sum_d (a_d + b_d)^2 + 4 sum_d delta_d^2 (a_d + b_d)

* ``metric="ip"`` (or ``"cosine"``, the same on unit-norm means, which is checked):
  the returned *distance* is the inner product of the means (larger is nearer, as in
  FAISS); for ``s = q . g``::

      E[s]   = mu_q . mu_g
      Var[s] = sum_d (a_d mu_g,d^2 + b_d mu_q,d^2 + a_d b_d)

``variance="mc"`` replaces these closed forms by the sample moments over ``n`` embedding
samples drawn under *shared* weight samples (the same generator seed for the gallery
and the queries), so the dependence between query and gallery through the weights is
kept; it stores ``n`` samples per item, ``n`` times the memory of the closed form.

What FAISS does (training, storage, the search itself, serialisation, GPU copies) is
left to FAISS. Written here: the user-id mapping (FAISS's ``IndexIDMap`` does not
cover every index type, e.g. HNSW), the per-item variances, the moments above, the
probability helpers, re-ranking and filtering, locking, and the file format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import Tensor
from tqdm.auto import tqdm

from lam_plugin.prediction import Prediction

__all__ = ["FORMAT_VERSION", "PosteriorLike", "SearchResult", "UncertainIndex"]

logger = logging.getLogger(__name__)

#: Version of the file written by :meth:`UncertainIndex.save`; other versions are refused.
FORMAT_VERSION = 1
_FORMAT_NAME = "lam_plugin.UncertainIndex"
#: Bound on the floats of one ``[queries, candidates, D]`` work array of a search.
_CHUNK_FLOATS = 1 << 24
_UNIT_NORM_TOL = 1e-3

Metric = Literal["l2", "ip", "cosine"]
VarianceMode = Literal["closed_form", "mc"]
Rerank = Literal["expected", "lcb"]


class PosteriorLike(Protocol):
    """What the index needs of a posterior (e.g. ``lam_plugin.posterior.EmbeddingPosterior``).

    ``predict`` must draw its weight samples from ``generator`` so that identically seeded
    calls share them whatever the batch (``"mc"`` mode relies on it).
    """

    @property
    def fingerprint(self) -> str:
        """Identifies the posterior; stored in saved indexes and checked on load."""

    def predict(
        self,
        x: Any,
        n: int = 30,
        generator: torch.Generator | None = None,
        return_samples: bool = False,
    ) -> Prediction:
        """The embedding distribution of the batch ``x`` from ``n`` weight samples."""


@dataclass(frozen=True)
class SearchResult:
    """The ``k`` neighbours of ``Q`` queries with the uncertainty of their distances.

    All arrays are numpy. Slots left empty (FAISS found fewer than ``k`` neighbours, or
    ``min_prob`` dropped them) are at the end of their row with id ``-1``, distance and
    expected distance ``+inf`` (``-inf`` for ``ip``) and NaN variance and probabilities.

    Attributes:
        ids: ``[Q, k]`` int64 user ids of the neighbours.
        distances: ``[Q, k]`` float32 FAISS distances of the means: squared L2 for
            ``metric="l2"``, inner product for ``"ip"``/``"cosine"``.
        variances: ``[Q, k]`` float32 variance of that squared distance (inner product)
            between the random query and neighbour embeddings (see the module docstring).
        expected: ``[Q, k]`` float32 its mean: ``E[d^2] = distances + sum(a + b)`` for
            l2 (the squared distance of the means underestimates it), ``E[s] = distances``
            for ip; the sample mean in Monte Carlo mode.
        query_uncertainty: ``[Q]`` float32 ``sum_d std_d`` of each query.
        metric: ``"l2"``, ``"ip"`` or ``"cosine"``.
        order_probabilities: ``[Q, k-1]`` float32, with ``return_probabilities=True``:
            probability that neighbour ``j`` is nearer than neighbour ``j+1``.
        within_probabilities: ``[Q, k]`` float32, with ``return_probabilities=True`` and
            a ``threshold``: :meth:`prob_within` of that threshold.
    """

    ids: np.ndarray
    distances: np.ndarray
    variances: np.ndarray
    expected: np.ndarray
    query_uncertainty: np.ndarray
    metric: str
    order_probabilities: np.ndarray | None = None
    within_probabilities: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        """``[Q, k]`` bool, False on empty slots."""
        return self.ids >= 0

    @property
    def std(self) -> np.ndarray:
        """``[Q, k]`` standard deviation of the distances, ``sqrt(variances)``."""
        return np.sqrt(self.variances)

    def prob_within(self, threshold: float) -> np.ndarray:
        """``[Q, k]`` probability that each neighbour lies on the near side of ``threshold``.

        ``threshold`` is in the units of :attr:`distances`: for ``l2`` a squared distance
        (a radius ``r`` is ``threshold=r**2``) and the probability is ``P(d^2 < threshold)``;
        for ``ip`` a similarity and it is ``P(s > threshold)``. Gaussian approximation:
        ``d^2`` (or ``s``) is taken as normal with mean :attr:`expected` and variance
        :attr:`variances` (``d^2`` is really a generalised chi-square; the approximation
        is good when many dimensions contribute, poor in the far tails)::

            P(d^2 < t) = Phi((t - E[d^2]) / sqrt(Var[d^2]))
        """
        return _prob_within(self.expected, self.variances, float(threshold), self.metric)

    def confidence_bound(self, z: float = 1.645) -> np.ndarray:
        """``[Q, k]`` the lower confidence bound of how near each neighbour is.

        ``E[d^2] + z sqrt(Var)`` for ``l2`` (``d^2`` is below it with probability about
        ``Phi(z)``), ``E[s] - z sqrt(Var)`` for ``ip``. A negative ``z`` gives the
        optimistic bound.
        """
        return _confidence_bound(self.expected, self.variances, float(z), self.metric)

    def __len__(self) -> int:
        return self.ids.shape[0]


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds off new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class UncertainIndex:
    """FAISS index over Gaussian embeddings; searches return distances with variances.

    Args:
        posterior: embeds images (see :class:`PosteriorLike`); ``None`` to index and
            search :class:`~lam_plugin.prediction.Prediction` objects only.
        metric: ``"l2"`` (distances are squared L2, as FAISS returns them), ``"ip"``
            (inner product, larger is nearer) or ``"cosine"`` (``ip`` on means that must
            be unit-norm, as a posterior's are).
        index_factory: a FAISS factory string, e.g. ``"Flat"`` (default, exact),
            ``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF256,PQ16"``. An index that needs
            training is trained on the first :meth:`add`'s means. For lossy encodings
            (PQ, SQ, PCA) the variance uses the index's reconstruction of each neighbour
            mean and leaves out the quantisation error.
        device: ``None``/``"cpu"``, or ``"cuda"``/``"cuda:i"`` to search on a GPU copy of
            the index (needs a faiss build with GPU support). Training and storage stay
            on the CPU index; the GPU copy is refreshed after each add.
        n_samples: weight samples per embedding (``n`` of ``posterior.predict``).
        batch_size: inputs per posterior call when embedding images.
        variance: ``"closed_form"`` stores the per-dimension variance of each item
            (``4 D`` bytes) and uses the closed forms of the module docstring;
            ``"mc"`` stores ``n_samples`` samples of each item (``4 n D`` bytes) drawn
            under weight samples shared with the queries, and uses sample moments.
        seed: seed of the generator passed to the posterior for every batch, so that
            all batches (gallery and queries) use the same weight samples.
        progress: show a tqdm bar while embedding.

    Thread safety: :meth:`search` may run from many threads at once; :meth:`add` and
    :meth:`set_search_parameters` wait for running searches and block new ones (GPU
    searches are serialised, FAISS GPU indexes are not thread-safe).
    """

    def __init__(
        self,
        posterior: PosteriorLike | None = None,
        *,
        metric: Metric = "l2",
        index_factory: str | None = None,
        device: str | torch.device | None = None,
        n_samples: int = 30,
        batch_size: int = 256,
        variance: VarianceMode = "closed_form",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if metric not in ("l2", "ip", "cosine"):
            raise ValueError(f"metric must be 'l2', 'ip' or 'cosine', got {metric!r}")
        if variance not in ("closed_form", "mc"):
            raise ValueError(f"variance must be 'closed_form' or 'mc', got {variance!r}")
        if int(n_samples) < 2:
            raise ValueError(f"n_samples must be at least 2, got {n_samples}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.posterior = posterior
        self.metric: str = metric
        self.index_factory = "Flat" if index_factory is None else index_factory
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.variance: str = variance
        self.seed = int(seed)
        self.progress = progress
        self._gpu_id = _gpu_device_id(device)
        self._gpu_res = faiss.StandardGpuResources() if self._gpu_id is not None else None
        self._gpu_index: Any = None
        self._gpu_lock = threading.Lock()
        self._lock = _ReadWriteLock()
        self._index: Any = None
        self._dim: int | None = None
        self._flat = False  # the index is an IndexFlat, whose storage is read directly
        self._fingerprint: str | None = None if posterior is None else str(posterior.fingerprint)
        self._ids = np.empty(0, dtype=np.int64)
        # closed form: [N, D] variances (std**2, squared once here) and [N] their sums;
        # mc: [N, n, D] samples, item-major so one fancy index gathers a neighbour's samples.
        self._var = np.empty((0, 0), dtype=np.float32)
        self._var_sum = np.empty(0, dtype=np.float32)
        self._samples = np.empty((0, self.n_samples, 0), dtype=np.float32)

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self._ids.shape[0])

    @property
    def dim(self) -> int | None:
        """Embedding dimension ``D``, ``None`` before the first add."""
        return self._dim

    @property
    def ids(self) -> np.ndarray:
        """``[N]`` int64 user ids in insertion order (a copy)."""
        return self._ids.copy()

    @property
    def faiss_index(self) -> Any:
        """The CPU FAISS index (row ``i`` holds the mean of ``ids[i]``); ``None`` before the first add.

        For reading and tuning only: vectors added to it directly would have no ids or variances.
        """
        return self._index

    @property
    def fingerprint(self) -> str | None:
        """Fingerprint of the posterior the gallery was embedded with, if any."""
        return self._fingerprint

    @property
    def extra_nbytes(self) -> int:
        """Bytes held beside the FAISS index: ids, variances (or samples) and their sums."""
        return self._ids.nbytes + self._var.nbytes + self._var_sum.nbytes + self._samples.nbytes

    # ------------------------------------------------------------------ mutation
    def add(self, data: Any, ids: Sequence[int] | np.ndarray | Tensor | None = None) -> UncertainIndex:
        """Embed and index ``data``; returns ``self``.

        Args:
            data: a :class:`Prediction` (``mean``/``std`` ``[B, D]``; in ``"mc"`` mode also
                ``samples`` ``[n_samples, B, D]`` drawn with ``generator`` seeded by
                :attr:`seed`), or inputs for the posterior: a tensor ``[B, ...]``, a dict
                of such tensors, or an iterable (e.g. a DataLoader) of batches ``x`` or
                ``(x, y, ...)``.
            ids: ``B`` distinct non-negative int64 user ids not in the index yet; by
                default ``max(existing ids) + 1`` onwards (``0 .. B-1`` on an empty index).
        """
        mean, var, samples, _ = self._prepare(data, "data")
        n = mean.shape[0]
        new_ids = None if ids is None else _as_ids(ids, n)
        with self._lock.write():
            if self._dim is not None and mean.shape[1] != self._dim:
                raise ValueError(f"data has dimension {mean.shape[1]}, the index has dimension {self._dim}")
            if new_ids is None:
                start = int(self._ids.max()) + 1 if len(self._ids) else 0
                new_ids = np.arange(start, start + n, dtype=np.int64)
            else:
                clash = new_ids[np.isin(new_ids, self._ids)]
                if clash.size:
                    raise ValueError(f"ids already in the index: {clash[:10].tolist()}")
            index = self._index if self._index is not None else self._new_index(mean)
            index.add(mean)
            self._index, self._dim = index, mean.shape[1]
            self._flat = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
            self._ids = np.concatenate([self._ids, new_ids])
            if self.variance == "mc":
                self._samples = np.concatenate([self._samples.reshape(-1, self.n_samples, self._dim), samples])
            else:
                self._var = np.concatenate([self._var.reshape(-1, self._dim), var])
                self._var_sum = np.concatenate([self._var_sum, var.sum(axis=1)])
            if self._gpu_id is not None:
                self._gpu_index = self._to_gpu(index)
            logger.info("added %d items, the index holds %d", n, len(self._ids))
        return self

    def set_search_parameters(self, params: str) -> None:
        """Set FAISS search parameters, e.g. ``"nprobe=64"`` or ``"efSearch=128"``.

        Uses ``faiss.ParameterSpace`` (``GpuParameterSpace`` for the GPU copy); they are
        saved with the index.
        """
        with self._lock.write():
            if self._index is None:
                raise ValueError("the index is empty: add items before setting search parameters")
            faiss.ParameterSpace().set_index_parameters(self._index, params)
            if self._gpu_index is not None:
                faiss.GpuParameterSpace().set_index_parameters(self._gpu_index, params)

    # ------------------------------------------------------------------ search
    def search(
        self,
        queries: Any,
        k: int,
        *,
        return_probabilities: bool = False,
        threshold: float | None = None,
        min_prob: float | None = None,
        rerank: Rerank | None = None,
        z: float = 1.645,
        candidates: int | None = None,
    ) -> SearchResult:
        """The ``k`` nearest items of each query, with distance variances.

        Args:
            queries: as ``data`` of :meth:`add` (a :class:`Prediction` ``[Q, D]``, or
                inputs embedded by the posterior).
            k: neighbours per query, ``1 <= k <= len(self)``.
            return_probabilities: also compute ``order_probabilities`` (``P(neighbour j
                nearer than j+1)``) and, given ``threshold``, ``within_probabilities``.
            threshold: a distance in the units of ``distances`` (l2: squared, so radius
                ``r`` is ``r**2``), used by ``min_prob`` and ``within_probabilities``.
            min_prob: drop neighbours with ``P(within threshold) < min_prob`` (empty slots).
            rerank: order the candidates by ``"expected"`` distance (``E[d^2]``; ``E[s]``)
                or by ``"lcb"``, the lower confidence bound of nearness with ``z``
                (:meth:`SearchResult.confidence_bound`), instead of the distance of means.
            z: the number of standard deviations of ``"lcb"``.
            candidates: FAISS neighbours fetched before re-ranking and filtering
                (``k <= candidates <= len(self)``; default ``k``).

        The probabilities use a Gaussian approximation of ``d^2`` (see
        :meth:`SearchResult.prob_within`). For the order of neighbours ``j`` and ``l``
        of one query, ``D = d_j^2 - d_l^2`` is taken as normal with mean
        ``E[d_j^2] - E[d_l^2]`` and, because both share the query's noise,
        ``Var[D] = u_j + u_l + 4 sum_d a_d (mu_j,d - mu_l,d)^2`` with
        ``u = 2 sum_d b_d (b_d + 2 a_d + 2 delta_d^2)`` (for ip:
        ``u = sum_d b_d (mu_q,d^2 + a_d)`` and factor 1 instead of 4); in ``"mc"`` mode the
        sample mean and variance of ``D``. ``P(j nearer) = Phi(-E[D] / sqrt(Var[D]))``.
        """
        k = _positive_int(k, "k")
        c = k if candidates is None else _positive_int(candidates, "candidates")
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
        if len(self) and c > len(self):  # checked again under the lock; fail before embedding
            raise ValueError(f"{'k' if c == k else 'candidates'}={c} exceeds the {len(self)} items in the index")
        q, a, q_samples, query_std = self._prepare(queries, "queries")
        with self._lock.read():
            n_items = len(self._ids)
            if n_items == 0:
                raise ValueError("the index is empty: add items before searching")
            if c > n_items:
                raise ValueError(f"{'k' if c == k else 'candidates'}={c} exceeds the {n_items} items in the index")
            if q.shape[1] != self._dim:
                raise ValueError(f"queries have dimension {q.shape[1]}, the index has dimension {self._dim}")
            per_query = c * self._dim * (self.n_samples if self.variance == "mc" else 1)
            step = max(1, _CHUNK_FLOATS // per_query)
            parts = [
                self._search_chunk(
                    q[i : i + step],
                    a[i : i + step],
                    None if q_samples is None else q_samples[i : i + step],
                    k,
                    c,
                    return_probabilities,
                    threshold,
                    min_prob,
                    rerank,
                    float(z),
                )
                for i in range(0, q.shape[0], step)
            ]
        fields = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return SearchResult(query_uncertainty=query_std.sum(axis=1), metric=self.metric, **fields)

    def _search_chunk(
        self,
        q: np.ndarray,
        a: np.ndarray,
        q_samples: np.ndarray | None,
        k: int,
        c: int,
        return_probabilities: bool,
        threshold: float | None,
        min_prob: float | None,
        rerank: Rerank | None,
        z: float,
    ) -> dict[str, np.ndarray]:
        """Search ``q`` ``[Qc, D]`` for ``c`` candidates, keep ``k``; arrays of :class:`SearchResult`."""
        dist, rows = self._faiss_search(q, c)
        valid = rows >= 0  # FAISS pads with -1 when it finds fewer than c (e.g. IVF, small nprobe)
        if not valid.all():  # placeholders, padded again at the end
            rows, dist = np.where(valid, rows, 0), np.where(valid, dist, np.float32(0))
        ip = self.metric != "l2"
        if self.variance == "mc":
            # [Qc, c, n] sample distances under shared weight samples
            gal = self._samples[rows]
            if ip:
                d_s = np.einsum("qcnd,qnd->qcn", gal, q_samples)
            else:
                gal -= q_samples[:, None]
                d_s = np.einsum("qcnd,qcnd->qcn", gal, gal)
            expected = d_s.mean(axis=2)
            variances = d_s.var(axis=2, ddof=1)
        else:  # [Qc, c, D] work arrays, updated in place (the search's main cost besides FAISS)
            mu, b = self._means(rows), self._var[rows]
            if ip:
                expected = dist.copy()
                variances = np.einsum("qcd,qd->qc", b, q * q + a)
                variances += np.einsum("qcd,qd->qc", np.square(mu, out=mu), a)
            else:
                expected = dist + a.sum(axis=1)[:, None] + self._var_sum[rows]
                s = b
                s += a[:, None]  # a + b
                mu -= q[:, None]  # -delta
                np.square(mu, out=mu)
                mu *= 2.0
                mu += s  # s + 2 delta^2
                variances = 2.0 * np.einsum("qcd,qcd->qc", s, mu)
            del mu, b
        within = None
        if threshold is not None and (min_prob is not None or return_probabilities):
            within = _prob_within(expected, variances, threshold, self.metric)
            if min_prob is not None:
                valid &= within >= min_prob
        reorder = rerank is not None or c > k or not valid.all()
        if reorder:
            if rerank == "expected":
                key = -expected if ip else expected
            elif rerank == "lcb":
                key = _confidence_bound(expected, variances, z, self.metric)
                key = -key if ip else key
            else:
                key = -dist if ip else dist
            perm = np.lexsort((key, ~valid), axis=1)[:, :k]  # valid first, then by key (stable)

        def take(x: np.ndarray) -> np.ndarray:
            """``x`` ``[Qc, c, ...]`` in the kept order, ``[Qc, k, ...]``."""
            if not reorder:
                return x
            return np.take_along_axis(x, perm.reshape(*perm.shape, *(1,) * (x.ndim - 2)), axis=1)

        dist, rows, valid, expected, variances = map(take, (dist, rows, valid, expected, variances))
        out: dict[str, np.ndarray] = {
            "ids": np.where(valid, self._ids[rows], -1),
            "distances": dist,
            "variances": variances.astype(np.float32, copy=False),
            "expected": expected.astype(np.float32, copy=False),
        }
        if return_probabilities:
            if self.variance == "mc":
                diff = take(d_s)
                diff = diff[:, :-1] - diff[:, 1:]  # [Qc, k-1, n]
                d_mean, d_var = diff.mean(axis=2), diff.var(axis=2, ddof=1)
            else:
                mu_k, b_k = self._means(rows), self._var[rows]
                if ip:
                    u = np.einsum("qkd,qd->qk", b_k, q * q + a)
                    factor = 1.0
                else:
                    delta2 = np.square(mu_k - q[:, None])
                    u = 2.0 * np.einsum("qkd,qkd->qk", b_k, b_k + 2.0 * (a[:, None] + delta2))
                    factor = 4.0
                gap = np.square(mu_k[:, :-1] - mu_k[:, 1:])
                d_mean = out["expected"][:, :-1] - out["expected"][:, 1:]
                d_var = u[:, :-1] + u[:, 1:] + factor * np.einsum("qkd,qd->qk", gap, a)
            order = _normal_cdf(d_mean if ip else -d_mean, d_var)
            order[~(valid[:, :-1] & valid[:, 1:])] = np.nan
            out["order_probabilities"] = order
            if within is not None:
                out["within_probabilities"] = take(within).astype(np.float32, copy=False)
        if not valid.all():
            pad = -np.inf if ip else np.inf
            for name in ("distances", "expected"):
                out[name] = np.where(valid, out[name], np.float32(pad))
            for name in ("variances", "within_probabilities"):
                if name in out:
                    out[name] = np.where(valid, out[name], np.float32(np.nan))
        return out

    def _means(self, rows: np.ndarray) -> np.ndarray:
        """``[..., D]`` stored means of index rows ``rows`` (a new array)."""
        if self._flat:  # a view of IndexFlat's storage: no OpenMP region for a small gather
            return faiss.rev_swig_ptr(self._index.get_xb(), self._index.ntotal * self._dim).reshape(-1, self._dim)[rows]
        return self._index.reconstruct_batch(rows.ravel()).reshape(*rows.shape, self._dim)

    def _faiss_search(self, q: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu_index is None:
            return self._index.search(q, c)
        with self._gpu_lock:
            return self._gpu_index.search(q, c)

    # ------------------------------------------------------------------ inputs
    def _prepare(self, data: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """``(mean [B, D], var [B, D], samples [B, n, D] in mc mode else None, std [B, D])``, float32."""
        pred = data if isinstance(data, Prediction) else self._embed(data, name)
        mean, std = _float32(pred.mean, f"{name}.mean"), _float32(pred.std, f"{name}.std")
        if mean.ndim != 2 or mean.shape[0] == 0 or mean.shape[1] == 0:
            raise ValueError(f"{name}.mean must have shape [B, D] with B, D >= 1, got {mean.shape}")
        if std.shape != mean.shape:
            raise ValueError(f"{name}.std must have the shape of {name}.mean {mean.shape}, got {std.shape}")
        if (std < 0).any():
            raise ValueError(f"{name}.std has negative entries")
        if self.metric == "cosine":
            norms = np.linalg.norm(mean, axis=1)
            if np.abs(norms - 1.0).max() > _UNIT_NORM_TOL:
                raise ValueError(f"metric='cosine' needs unit-norm {name}.mean, norms range {norms.min():.4g}..{norms.max():.4g}")
        samples = None
        if self.variance == "mc":
            if pred.samples is None:
                raise ValueError(f"variance='mc' needs {name}.samples [n_samples, B, D] (predict with return_samples=True)")
            samples = _float32(pred.samples, f"{name}.samples")
            if samples.shape != (self.n_samples, *mean.shape):
                raise ValueError(f"{name}.samples must have shape {(self.n_samples, *mean.shape)}, got {samples.shape}")
            samples = np.ascontiguousarray(samples.transpose(1, 0, 2))
        return mean, std * std, samples, std

    @torch.no_grad()
    def _embed(self, data: Any, name: str) -> Prediction:
        if self.posterior is None:
            raise ValueError(f"{name} must be a Prediction: this index has no posterior to embed inputs with")
        batches, total = _batches(data, self.batch_size, name)
        preds = []
        for x in tqdm(batches, total=total, desc=f"embedding {name}", disable=not self.progress, leave=False):
            generator = torch.Generator().manual_seed(self.seed)  # same weight samples for every batch
            preds.append(
                self.posterior.predict(
                    x, n=self.n_samples, generator=generator, return_samples=self.variance == "mc"
                ).to("cpu")
            )
        if not preds:
            raise ValueError(f"{name} is empty")
        return Prediction(
            mean=torch.cat([p.mean for p in preds]),
            std=torch.cat([p.std for p in preds]),
            samples=None if preds[0].samples is None else torch.cat([p.samples for p in preds], dim=1),
        )

    # ------------------------------------------------------------------ FAISS plumbing
    def _new_index(self, train_on: np.ndarray) -> Any:
        n, dim = train_on.shape
        faiss_metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        index = faiss.index_factory(dim, self.index_factory, faiss_metric)
        if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
            raise ValueError("UncertainIndex keeps the ids itself: remove 'IDMap' from index_factory")
        if not index.is_trained:
            needed = _min_training_points(index)
            if n < needed:
                raise ValueError(
                    f"index_factory {self.index_factory!r} is trained on the first add, which needs at least "
                    f"{needed} vectors, got {n}"
                )
            logger.info("training %r on %d vectors", self.index_factory, n)
            try:
                index.train(train_on)
            except RuntimeError as err:
                raise ValueError(f"training {self.index_factory!r} on {n} vectors failed: {err}") from err
        try:  # IVF indexes reconstruct stored vectors by id only with a direct map
            faiss.extract_index_ivf(index).make_direct_map()
        except RuntimeError:
            pass  # not an IVF index
        return index

    def _to_gpu(self, index: Any) -> Any:
        try:
            return faiss.index_cpu_to_gpu(self._gpu_res, self._gpu_id, index)
        except RuntimeError as err:
            raise ValueError(f"faiss cannot move a {self.index_factory!r} index to the GPU: {err}") from err

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to a safetensors file (data and string metadata only).

        Tensors: ``faiss_index`` (``faiss.serialize_index`` bytes, uint8), ``ids`` int64
        ``[N]``, ``var`` float32 ``[N, D]`` (closed form) or ``samples`` float32
        ``[N, n, D]`` (mc). Metadata: format name and :data:`FORMAT_VERSION`, the
        configuration (JSON), the posterior fingerprint and a SHA-256 of the tensors.
        Written to a temporary file first, then renamed.
        """
        path = Path(path)
        with self._lock.read():
            if self._index is None:
                raise ValueError("the index is empty: nothing to save")
            tensors = {"faiss_index": faiss.serialize_index(self._index), "ids": self._ids}
            tensors.update({"samples": self._samples} if self.variance == "mc" else {"var": self._var})
            config = {
                "metric": self.metric,
                "index_factory": self.index_factory,
                "n_samples": self.n_samples,
                "batch_size": self.batch_size,
                "variance": self.variance,
                "seed": self.seed,
                "dim": self._dim,
            }
            metadata = {
                "format": _FORMAT_NAME,
                "format_version": str(FORMAT_VERSION),
                "config": json.dumps(config),
                "posterior_fingerprint": self._fingerprint or "",
                "sha256": _checksum(tensors),
            }
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        logger.info("saved %d items to %s", len(self._ids), path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        posterior: PosteriorLike | None = None,
        *,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> UncertainIndex:
        """Read an index written by :meth:`save`.

        Without ``posterior`` the index searches :class:`Prediction` queries only. A
        posterior whose ``fingerprint`` differs from the stored one is refused, as are
        files of another format or version and files whose checksum does not match.
        """
        path = Path(path)
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT_NAME:
                    raise ValueError(f"{path} is not an UncertainIndex file (format {meta.get('format')!r})")
                if meta.get("format_version") != str(FORMAT_VERSION):
                    raise ValueError(
                        f"{path} has format version {meta.get('format_version')!r}; this version of lam_plugin "
                        f"reads version {FORMAT_VERSION} only"
                    )
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
        if _checksum(tensors) != meta.get("sha256"):
            raise ValueError(f"{path} is corrupted: its checksum does not match")
        stored = meta.get("posterior_fingerprint") or None
        if posterior is not None:
            given = str(posterior.fingerprint)
            if stored is None:
                logger.warning("%s was built without a posterior; its fingerprint cannot be checked", path)
            elif given != stored:
                raise ValueError(
                    f"the posterior does not match the one {path} was built with "
                    f"(fingerprint {given!r}, stored {stored!r})"
                )
        config = json.loads(meta["config"])
        dim = int(config.pop("dim"))
        self = cls(posterior, device=device, progress=progress, **config)
        try:
            index = faiss.deserialize_index(tensors["faiss_index"])
        except RuntimeError as err:
            raise ValueError(f"{path}: the FAISS index cannot be read: {err}") from err
        ids = tensors["ids"]
        body = tensors["samples"] if self.variance == "mc" else tensors["var"]
        if index.d != dim or index.ntotal != len(ids) or body.shape[0] != len(ids) or body.shape[-1] != dim:
            raise ValueError(f"{path} is inconsistent: {index.ntotal} vectors, {len(ids)} ids, data {body.shape}")
        self._index, self._dim, self._ids = index, dim, ids
        self._flat = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
        self._fingerprint = stored if stored is not None else self._fingerprint
        if self.variance == "mc":
            self._samples = body
        else:
            self._var, self._var_sum = body, body.sum(axis=1)
        if self._gpu_id is not None:
            self._gpu_index = self._to_gpu(index)
        logger.info("loaded %d items from %s", len(ids), path)
        return self

    def __repr__(self) -> str:
        return (
            f"UncertainIndex(items={len(self)}, dim={self._dim}, metric={self.metric!r}, "
            f"index_factory={self.index_factory!r}, variance={self.variance!r}, "
            f"device={'cpu' if self._gpu_id is None else f'cuda:{self._gpu_id}'})"
        )


# ---------------------------------------------------------------------- helpers
def _normal_cdf(num: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``Phi(num / sqrt(var))`` elementwise; for ``var == 0`` the limit (0, 1/2 or 1), NaN for NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = num / np.sqrt(var)
        degenerate = var == 0  # NaN (empty slots) stays NaN
        ratio = np.where(degenerate, np.sign(num) * np.inf, ratio)
        ratio = np.where(degenerate & (num == 0), 0.0, ratio)
    return torch.special.ndtr(torch.from_numpy(np.asarray(ratio, dtype=np.float32))).numpy()


def _prob_within(expected: np.ndarray, variances: np.ndarray, threshold: float, metric: str) -> np.ndarray:
    gap = expected - threshold if metric != "l2" else threshold - expected
    return _normal_cdf(gap, variances)


def _confidence_bound(expected: np.ndarray, variances: np.ndarray, z: float, metric: str) -> np.ndarray:
    spread = z * np.sqrt(variances)
    return expected - spread if metric != "l2" else expected + spread


def _gpu_device_id(device: str | torch.device | None) -> int | None:
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


def _min_training_points(index: Any) -> int:
    """Fewest training vectors FAISS accepts: the IVF ``nlist`` and the PQ codebook size."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    needed = getattr(inner, "nlist", 1)
    pq = getattr(inner, "pq", None)
    return max(needed, pq.ksub if pq is not None else 1)


def _batches(data: Any, batch_size: int, name: str) -> tuple[Iterable[Any], int | None]:
    """Batches of posterior inputs from a tensor, a dict of tensors or an iterable of batches."""
    if isinstance(data, Tensor):
        if data.ndim == 0:
            raise ValueError(f"{name} must be a batch [B, ...], got a scalar tensor")
        n = data.shape[0]
        return (data[i : i + batch_size] for i in range(0, n, batch_size)), -(-n // batch_size)
    if isinstance(data, Mapping):
        lengths = {key: value.shape[0] for key, value in data.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the tensors of {name} must have the same batch size, got {lengths}")
        n = next(iter(lengths.values()))
        return (
            {key: value[i : i + batch_size] for key, value in data.items()} for i in range(0, n, batch_size)
        ), -(-n // batch_size)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        total = len(data) if hasattr(data, "__len__") else None
        return (b[0] if isinstance(b, (tuple, list)) else b for b in data), total
    raise TypeError(
        f"{name} must be a Prediction, a tensor, a dict of tensors or an iterable of batches, "
        f"got {type(data).__name__}"
    )


def _float32(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    return arr


def _as_ids(ids: Sequence[int] | np.ndarray | Tensor, n: int) -> np.ndarray:
    arr = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    if arr.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if (arr < 0).any():
        raise ValueError("ids must be non-negative (-1 marks empty result slots)")
    if np.unique(arr).size != n:
        raise ValueError("ids has duplicates")
    return arr


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _checksum(tensors: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(tensors[key]).tobytes())
    return digest.hexdigest()
