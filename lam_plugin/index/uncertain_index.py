"""UncertainIndex: a FAISS index over Gaussian embeddings whose searches return each
neighbour's distance with its variance (the maths: :mod:`lam_plugin.index`)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..arguments import positive_int
from ..prediction import Prediction
from . import moments, storage
from .faiss_backend import gpu_device_id, new_index, to_gpu
from .inputs import as_ids, batches, float32
from .rows import GrowingRows
from .locking import ReadWriteLock
from .result import SearchResult, confidence_bound, normal_cdf, prob_within

__all__ = ["PosteriorLike", "UncertainIndex"]

logger = logging.getLogger(__name__)

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
            (``4 D`` bytes) and uses the closed forms of :mod:`lam_plugin.index`;
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
        if isinstance(posterior, torch.nn.Module):
            raise TypeError(
                "UncertainIndex takes a fitted posterior (LaplaceEmbedder(model).fit(loader)), not the model"
            )
        if positive_int(n_samples, "n_samples") < 2:
            raise ValueError(f"n_samples must be at least 2, got {n_samples}")
        positive_int(batch_size, "batch_size")
        if index_factory is not None and (not isinstance(index_factory, str) or not index_factory.strip()):
            raise ValueError(f"index_factory must be a FAISS factory string such as 'Flat', got {index_factory!r}")
        self.posterior = posterior
        self.metric: str = metric
        self.index_factory = "Flat" if index_factory is None else index_factory
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.variance: str = variance
        self.seed = int(seed)
        self.progress = progress
        self._gpu_id = gpu_device_id(device)
        self._gpu_res = faiss.StandardGpuResources() if self._gpu_id is not None else None
        self._gpu_index: Any = None
        self._gpu_lock = threading.Lock()
        self._lock = ReadWriteLock()
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
        self._rows = {
            "ids": GrowingRows(self._ids),
            "var": GrowingRows(self._var),
            "var_sum": GrowingRows(self._var_sum),
            "samples": GrowingRows(self._samples),
        }

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
        if isinstance(data, (Prediction, Tensor, Mapping)):
            self._add_rows(*self._prepare(data, "data")[:3], None if ids is None else as_ids(ids, _length(data)))
            self._added(_length(data))
            return self
        given = None if ids is None else np.asarray(ids.detach().cpu() if isinstance(ids, Tensor) else ids)
        done, pending, before = 0, [], len(self._ids)
        try:
            for pred in self._predictions(data, "data"):
                rows = self._check(pred, "data")[:3]
                chunk = None if given is None else as_ids(given[done : done + len(rows[0])], len(rows[0]))
                done += len(rows[0])
                if self._index is None and (pending or _needs_training(self.index_factory, rows[0].shape[1])):
                    pending.append((rows, chunk))  # an index that needs training is trained on all of the first add
                    continue
                self._add_rows(*rows, chunk)
            if done == 0:
                raise ValueError("data is empty")
            if given is not None and done != len(given):
                raise ValueError(f"ids has {len(given)} entries, data has {done} items")
            if pending:
                (mean, var, samples), chunk = _concat(pending)
                self._add_rows(mean, var, samples, chunk)
        finally:  # the GPU copy holds what was added, even when a later batch fails
            if len(self._ids) > before:
                self._added(len(self._ids) - before)
        return self

    def _added(self, n: int) -> None:
        """After an ``add`` of ``n`` items: refresh the GPU copy once (not per batch of a
        streamed loader) and say what the index holds."""
        if self._gpu_id is not None:
            with self._lock.write():
                self._gpu_index = to_gpu(self._gpu_res, self._gpu_id, self._index, self.index_factory)
        logger.info("added %d items, the index holds %d", n, len(self._ids))

    def _add_rows(self, mean: np.ndarray, var: np.ndarray, samples: np.ndarray | None, new_ids: np.ndarray | None) -> None:
        """Index checked rows: means ``[B, D]``, variances ``[B, D]``, samples ``[B, n, D]``
        (``"mc"`` mode), under ``new_ids`` (default: after the largest id)."""
        n = mean.shape[0]
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
            index = self._index if self._index is not None else new_index(mean, self.index_factory, self.metric)
            index.add(mean)
            self._index, self._dim = index, mean.shape[1]
            self._flat = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
            self._ids = self._rows["ids"].append(new_ids)
            if self.variance == "mc":
                self._samples = self._rows["samples"].append(samples)  # type: ignore[arg-type]
            else:
                self._var = self._rows["var"].append(var)
                self._var_sum = self._rows["var_sum"].append(var.sum(axis=1))
            logger.debug("added %d rows, the index holds %d", n, len(self._ids))

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
        :meth:`SearchResult.prob_within`). For the order of neighbours ``j`` and ``j+1``
        of one query, ``D = d_j^2 - d_(j+1)^2`` is taken as normal, with a variance that
        counts the query's noise shared by both (:mod:`lam_plugin.index.moments` has the
        formulas; in ``"mc"`` mode the sample moments of ``D``):
        ``P(j nearer) = Phi(-E[D] / sqrt(Var[D]))``.
        """
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
        if self.variance == "mc":  # [Qc, c, n] sample distances under shared weight samples
            d_s = moments.sample_distances(self._samples[rows], q_samples, ip)
            expected, variances = d_s.mean(axis=2), d_s.var(axis=2, ddof=1)
        else:
            expected, variances = moments.closed_form(
                q, a, dist, self._means(rows), self._var[rows], self._var_sum[rows], ip
            )
        within = None
        if threshold is not None and (min_prob is not None or return_probabilities):
            within = prob_within(expected, variances, threshold, self.metric)
            if min_prob is not None:
                valid &= within >= min_prob
        reorder = rerank is not None or c > k or not valid.all()
        if reorder:
            if rerank == "expected":
                key = -expected if ip else expected
            elif rerank == "lcb":
                key = confidence_bound(expected, variances, z, self.metric)
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
                d_mean, d_var = moments.order_samples(take(d_s))
            else:
                d_mean, d_var = moments.order_closed_form(
                    q, a, self._means(rows), self._var[rows], out["expected"], ip
                )
            order = normal_cdf(d_mean if ip else -d_mean, d_var)
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
        """``(mean [B, D], var [B, D], samples [B, n, D] in mc mode else None, std [B, D])``, float32,
        of all of ``data``."""
        preds = list(self._predictions(data, name))
        if not preds:
            raise ValueError(f"{name} is empty")
        return self._check(Prediction.concat(preds), name)

    def _check(self, pred: Prediction, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """The checked float32 arrays of :meth:`_prepare` for one prediction."""
        mean, std = float32(pred.mean, f"{name}.mean"), float32(pred.std, f"{name}.std")
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
            samples = float32(pred.samples, f"{name}.samples")
            if samples.shape != (self.n_samples, *mean.shape):
                raise ValueError(f"{name}.samples must have shape {(self.n_samples, *mean.shape)}, got {samples.shape}")
            samples = np.ascontiguousarray(samples.transpose(1, 0, 2))
        return mean, std * std, samples, std

    @torch.no_grad()
    def _predictions(self, data: Any, name: str) -> Iterator[Prediction]:
        """One prediction per batch of ``data`` (``data`` itself if it is one), on the CPU;
        every batch is embedded with the same weight samples."""
        if isinstance(data, Prediction):
            yield data
            return
        if self.posterior is None:
            raise ValueError(f"{name} must be a Prediction: this index has no posterior to embed inputs with")
        parts, total = batches(data, self.batch_size, name)
        for x in tqdm(parts, total=total, desc=f"embedding {name}", disable=not self.progress, leave=False):
            generator = torch.Generator().manual_seed(self.seed)  # same weight samples for every batch
            yield self.posterior.predict(
                x, n=self.n_samples, generator=generator, return_samples=self.variance == "mc"
            ).to("cpu")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to a safetensors file (data and string metadata only; see
        :mod:`lam_plugin.index.storage`), through a temporary file renamed at the end."""
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
            storage.write(path, tensors, config, self._fingerprint)
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
        tensors, config, stored = storage.read(path)
        if posterior is not None:
            given = str(posterior.fingerprint)
            if stored is None:
                logger.warning("%s was built without a posterior; its fingerprint cannot be checked", path)
            elif given != stored:
                raise ValueError(
                    f"the posterior does not match the one {path} was built with "
                    f"(fingerprint {given!r}, stored {stored!r})"
                )
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
        self._rows = {
            "ids": GrowingRows(self._ids),
            "var": GrowingRows(self._var),
            "var_sum": GrowingRows(self._var_sum),
            "samples": GrowingRows(self._samples),
        }
        if self._gpu_id is not None:
            self._gpu_index = to_gpu(self._gpu_res, self._gpu_id, index, self.index_factory)
        logger.info("loaded %d items from %s", len(ids), path)
        return self

    def __repr__(self) -> str:
        return (
            f"UncertainIndex(items={len(self)}, dim={self._dim}, metric={self.metric!r}, "
            f"index_factory={self.index_factory!r}, variance={self.variance!r}, "
            f"device={'cpu' if self._gpu_id is None else f'cuda:{self._gpu_id}'})"
        )


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


def _concat(
    parts: list[tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray | None]],
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray | None]:
    """The rows and ids of several chunks as one."""
    means, variances, samples = zip(*(rows for rows, _ in parts))
    ids = [chunk for _, chunk in parts]
    rows = (
        np.concatenate(means),
        np.concatenate(variances),
        None if samples[0] is None else np.concatenate(samples),  # type: ignore[arg-type]
    )
    return rows, None if ids[0] is None else np.concatenate(ids)  # type: ignore[arg-type]
