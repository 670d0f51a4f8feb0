"""UncertainIndex: a FAISS index over Gaussian embeddings whose searches return each
neighbour's distance with its variance (the maths: :mod:`lam_plugin.index`).

The class holds the configuration, the state and the public methods; the work is in
``_embedding`` (inputs to checked rows), ``_adding`` (the add path), ``_searching`` (the
search path) and ``_persistence`` (save and load).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np
import torch
from torch import Tensor

from ..arguments import positive_int
from ..prediction import Prediction
from . import _adding, _embedding, _merging, _sharding, storage
from ._persistence import check_config, check_fingerprint, file_config, file_tensors, restore
from ._searching import (
    Rerank,
    SearchOptions,
    check_search_arguments,
    check_searchable,
    search_rows,
    too_many,
)
from .faiss_backend import check_removable, gpu_placement, remove_rows
from .inputs import as_ids
from .items import VARIANCE_DTYPES, ItemStore
from .locking import ReadWriteLock
from .result import SearchResult

__all__ = ["PosteriorLike", "UncertainIndex"]

logger = logging.getLogger(__name__)

Metric = Literal["l2", "ip", "cosine"]
VarianceMode = Literal["closed_form", "mc"]
VarianceDtype = Literal["float16", "float32", "8bit", "4bit", "3bit"]


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
            training is trained by :meth:`train`, else on the means of the first items
            of the first :meth:`add` (see ``train_size``), as are variances stored in bits.
            For lossy encodings (PQ, SQ, PCA) the variance uses the index's reconstruction
            of each neighbour mean and leaves out the quantisation error. Refused, on the
            first add: PCA or ITQ under ``"ip"``/``"cosine"`` (FAISS centres the vectors,
            so its inner products are not the embeddings'), and LSH (Hamming counts).
        device: ``None``/``"cpu"``; ``"cuda"``/``"cuda:i"`` to search on a GPU copy of
            the index, or ``"cuda:all"`` for a copy on every GPU FAISS sees (its
            ``index_cpu_to_all_gpus``: replicated, or sharded with ``gpu_shards``). Needs
            a faiss build with GPU support. Training and storage stay on the CPU index;
            adds go to both (the GPU copy takes the new means, it is not copied again;
            a Flat index sharded over GPUs, whose FAISS shards take one add only, is
            copied at the next search), a removal or a merge copies the CPU index anew;
            a copy that cannot follow is dropped, never kept stale.
        gpu_shards: with ``device="cuda:all"``, split the vectors across the GPUs
            (for a gallery larger than one GPU's memory) instead of copying all of
            them to each.
        n_samples: weight samples per embedding (``n`` of ``posterior.predict``).
        batch_size: inputs per posterior call when embedding images.
        variance: ``"closed_form"`` stores the per-dimension variance of each item
            and uses the closed forms of :mod:`lam_plugin.index`; ``"mc"`` stores
            ``n_samples`` samples of each item (``4 n D`` bytes) drawn under weight
            samples shared with the queries, and uses sample moments.
        variance_dtype: storage of the closed-form variances: ``"float16"`` (default;
            ``2 D + 16`` bytes per item with the id, a per-item scale and the variance
            sum) keeps every returned variance within a relative ``1e-3`` of
            ``"float32"`` storage (``4 D + 12`` bytes; exact), up to an absolute term
            ``2^-38 max_d b_d E[d^2]`` (:mod:`lam_plugin.index.items` has the bound).
            ``"3bit"``, ``"4bit"``, ``"8bit"``: the variance sum as a per-item scale and
            the shape quantised to that many bits per dimension, trained like the index
            (``ceil(D/8) bits + 12`` bytes per item: 60 at ``D = 128``, 3 bits); the error
            is measured, 0.7 % of a returned variance at the median with 3 bits
            (:mod:`lam_plugin.index.variance_codes`).
            Not used by ``"mc"``, whose samples stay float32.
        train_size: for an index that needs training and is not trained by
            :meth:`train`: the items the first :meth:`add` trains it on. Default
            ``max(10_000, 40 k)`` for ``k`` the IVF lists or PQ centroids (``2^nbits``)
            of the factory. Drawn at random (with ``seed``) where the data can be
            sampled (a tensor, a dict of tensors, a DataLoader whose default sampler
            yields all of its map-style dataset)
            and holds more than twice as many, and embedded once more when added; else
            the first items, buffered until there are ``train_size`` or the add ends.
        seed: seed of the generator passed to the posterior for every batch, so that
            all batches (gallery and queries) use the same weight samples.
        progress: show a tqdm bar while embedding.

    Thread safety: :meth:`search` may run from many threads at once; :meth:`add`,
    :meth:`remove`, :meth:`train` (when it installs the trained index) and
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
        variance_dtype: VarianceDtype = "float16",
        train_size: int | None = None,
        seed: int = 0,
        progress: bool = True,
        gpu_shards: bool = False,
    ) -> None:
        if metric not in ("l2", "ip", "cosine"):
            raise ValueError(f"metric must be 'l2', 'ip' or 'cosine', got {metric!r}")
        if variance not in ("closed_form", "mc"):
            raise ValueError(f"variance must be 'closed_form' or 'mc', got {variance!r}")
        if variance_dtype not in VARIANCE_DTYPES:
            raise ValueError(f"variance_dtype must be one of {', '.join(map(repr, VARIANCE_DTYPES))}, got {variance_dtype!r}")
        if isinstance(posterior, torch.nn.Module):
            raise TypeError(
                "UncertainIndex takes a fitted posterior (LaplaceEmbedder(model).fit(loader)), not the model"
            )
        if positive_int(n_samples, "n_samples") < 2:
            raise ValueError(f"n_samples must be at least 2, got {n_samples}")
        positive_int(batch_size, "batch_size")
        self.train_size = None if train_size is None else positive_int(train_size, "train_size")
        if index_factory is not None and (not isinstance(index_factory, str) or not index_factory.strip()):
            raise ValueError(f"index_factory must be a FAISS factory string such as 'Flat', got {index_factory!r}")
        self.posterior = posterior
        self.metric: str = metric
        self.index_factory = "Flat" if index_factory is None else index_factory
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.variance: str = variance
        self.variance_dtype: str = variance_dtype
        self.seed = int(seed)
        self.progress = progress
        self.gpu_shards = bool(gpu_shards)
        self._gpu = gpu_placement(device, self.gpu_shards)
        self._gpu_index: Any = None
        self._gpu_lock = threading.Lock()
        self._lock = ReadWriteLock()
        self._index: Any = None
        self._dim: int | None = None
        self._flat = False  # the index is an IndexFlat, whose storage is read directly
        self._trained_digest: str | None = None  # faiss_backend.trained_digest of _index, once taken
        self._fingerprint: str | None = None if posterior is None else str(posterior.fingerprint)
        self._items = ItemStore(variance, variance_dtype, self.n_samples)  # row i of each: FAISS row i

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return len(self._items)

    @property
    def dim(self) -> int | None:
        """Embedding dimension ``D``, ``None`` before the first add or :meth:`train`."""
        return self._dim

    @property
    def ids(self) -> np.ndarray:
        """``[N]`` int64 user ids in insertion order (a copy)."""
        return self._items.ids.copy()

    @property
    def faiss_index(self) -> Any:
        """The CPU FAISS index (row ``i`` holds the mean of ``ids[i]``); ``None`` before the
        first add or :meth:`train`.

        For reading and tuning only: vectors added to it directly would have no ids or variances.
        """
        return self._index

    @property
    def fingerprint(self) -> str | None:
        """Fingerprint of the posterior the gallery was embedded with, if any."""
        return self._fingerprint

    @property
    def extra_nbytes(self) -> int:
        """Bytes held beside the FAISS index: ids, variances (with their scales and sums)
        or samples, of the items held (the growable buffers may hold up to twice as many rows)."""
        return self._items.nbytes

    # ------------------------------------------------------------------ mutation
    def add(self, data: Any, ids: Sequence[int] | np.ndarray | Tensor | None = None) -> UncertainIndex:
        """Embed and index ``data`` batch by batch, in bounded memory; returns ``self``.

        Args:
            data: a :class:`Prediction` (``mean``/``std`` ``[B, D]``; in ``"mc"`` mode also
                ``samples`` ``[n_samples, B, D]`` drawn with ``generator`` seeded by
                :attr:`seed`), or inputs for the posterior: a tensor ``[B, ...]``, a dict
                of such tensors, or an iterable (e.g. a DataLoader) of batches ``x`` or
                ``(x, y, ...)``.
            ids: ``B`` distinct non-negative int64 user ids not in the index yet; by
                default ``max(existing ids) + 1`` onwards (``0 .. B-1`` on an empty index).

        Each batch is embedded, added to FAISS and appended to the stored variances
        (amortised O(1) per item); only an index still to be trained buffers items
        first (``train_size``). Items of a wrong dimension or dtype are refused; a
        streamed add keeps the batches it added before a failing one.
        """
        _adding.add(self, data, ids)
        return self

    def train(self, data: Any, *, across_ranks: bool = False) -> UncertainIndex:
        """Train the FAISS index of this empty index on the means of ``data`` (as in
        :meth:`add`; all of it, which FAISS subsamples to 256 points per centroid), so
        that :meth:`add` streams without buffering. Adds nothing; returns ``self``.

        Raises ``ValueError`` for fewer items than the index needs (e.g. the IVF lists)
        and on an index that is trained already; nothing changes then.

        ``across_ranks=True`` in a process group (a collective): rank 0 trains on all ranks'
        parts in rank order and every rank gets the trained state (for :meth:`gather`);
        an error is raised on every rank. Outside a process group, a plain train.
        """
        _sharding.train(self, data, across_ranks)
        return self

    def remove(self, ids: Sequence[int] | np.ndarray | Tensor) -> UncertainIndex:
        """Remove the items ``ids`` (distinct) from FAISS and from the stored variances;
        searches never return them again. Returns ``self``.

        O(N) per call (FAISS's ``remove_ids``, then the stored arrays are compacted; IVF
        labels are renumbered to stay row numbers). Unknown ids, and index types FAISS
        cannot remove from (HNSW), are
        refused with ``ValueError`` before anything changes. Removed ids may be given
        again, and default ids restart after the largest id left.
        """
        wanted = as_ids(ids)
        with self._lock.write():
            rows = self._items.rows_of(wanted)
            if not rows.size:
                return self
            check_removable(self._index, self.index_factory)
            remove_rows(self._index, rows)
            self._items.delete(rows)
        _adding.refresh(self, f"removed {rows.size} items")
        return self

    def merge(self, other: UncertainIndex) -> UncertainIndex:
        """Append the ``M`` items of ``other`` after the ``N`` here (FAISS ``merge_from``, IVF
        labels offset by ``N``); returns ``self``; ``other`` is left empty, still trained.
        ``ValueError``, before anything changes, unless both share the configuration (metric,
        index_factory, variance(_dtype), n_samples, seed, dim, fingerprint), the trained state
        (SHA-256 of the emptied FAISS index, of the variance bins) and no id, and FAISS can
        merge the type (Flat, PQ, SQ, IVF, also behind PCA/OPQ; not HNSW nor fast scan)."""
        _merging.merge(self, other)
        return self

    def gather(self, dst: int = 0) -> UncertainIndex | None:
        """Collective: on rank ``dst`` this index becomes the merge of every rank's shard in
        rank order and is returned; other ranks keep theirs and get ``None`` (``self`` outside
        a process group). Every rank first checks that all share the configuration and trained
        state (:meth:`train` ``across_ranks=True``) and hold distinct ids, raising one error.
        ``dst`` receives the shards one at a time; only rank 0 saves files (keep ``dst=0``)."""
        return self if _sharding.gather(self, dst) else None

    def set_search_parameters(self, params: str) -> None:
        """Set FAISS search parameters, e.g. ``"nprobe=64"`` or ``"efSearch=128"``.

        Uses ``faiss.ParameterSpace`` (``GpuParameterSpace`` for the GPU copy); they are
        saved with the index.
        """
        with self._lock.write():
            if self._index is None:
                raise ValueError("the index is empty: add items before setting search parameters")
            # faiss's stub lists the string overload without @overload, so mypy sees only the int one
            faiss.ParameterSpace().set_index_parameters(self._index, params)  # type: ignore[arg-type]
            if self._gpu_index is not None:
                faiss.GpuParameterSpace().set_index_parameters(self._gpu_index, params)  # type: ignore[arg-type]

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
        k, c = check_search_arguments(k, candidates, threshold, min_prob, rerank, z)
        if len(self) and c > len(self):  # checked again under the lock; fail before embedding
            raise ValueError(too_many(k, c, len(self)))
        q, a, q_samples, query_std = _embedding.prepare(self, queries, "queries")
        with self._lock.read():
            check_searchable(self, q, k, c)
            options = SearchOptions(k, c, return_probabilities, threshold, min_prob, rerank, float(z))
            fields = search_rows(self, q, a, q_samples, options)
        return SearchResult(query_uncertainty=query_std.sum(axis=1), metric=self.metric, **fields)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to a safetensors file (data and string metadata only; see
        :mod:`lam_plugin.index.storage`), through a temporary file renamed at the end."""
        path = Path(path)
        with self._lock.read():
            if self._index is None:
                raise ValueError("the index is empty: nothing to save")
            storage.write(path, file_tensors(self), file_config(self), self._fingerprint)
        logger.info("saved %d items to %s", len(self._items), path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        posterior: PosteriorLike | None = None,
        *,
        device: str | torch.device | None = None,
        progress: bool = True,
        gpu_shards: bool = False,
    ) -> UncertainIndex:
        """Read an index written by :meth:`save`.

        ``device`` and ``gpu_shards`` place the GPU copy as in the constructor.
        Without ``posterior`` the index searches :class:`Prediction` queries only. A
        posterior whose ``fingerprint`` differs from the stored one is refused, as are
        files of another format or version and files whose checksum does not match.
        """
        path = Path(path)
        tensors, config, stored = storage.read(path)
        check_fingerprint(path, posterior, stored)
        dim = check_config(path, config)
        self = cls(posterior, device=device, progress=progress, gpu_shards=gpu_shards, **config)
        restore(self, path, tensors, dim, stored)
        logger.info("loaded %d items from %s", len(self._items), path)
        return self

    def __repr__(self) -> str:
        return (
            f"UncertainIndex(items={len(self)}, dim={self._dim}, metric={self.metric!r}, "
            f"index_factory={self.index_factory!r}, variance={self.variance!r}, "
            f"device={'cpu' if self._gpu is None else self._gpu.label})"
        )
