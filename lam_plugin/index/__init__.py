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
probability helpers, re-ranking and filtering, locking, and the file format, in:

* ``uncertain_index``: :class:`UncertainIndex`, its configuration, state and public
  methods (add, train, remove, search, save, load), which hand the work to the private
  modules ``_embedding`` (inputs to checked rows), ``_adding`` (the streamed add path
  and training), ``_searching`` (the search path: moments, re-ranking, filtering,
  probabilities) and ``_persistence`` (what save writes and load checks);
* ``items``: the per-item arrays beside FAISS (ids, float16 or float32 variances, or
  samples) and the error bound of float16 storage; ``rows``: arrays that grow by rows
  in amortised O(1) and a log-structured set of ids;
* ``result``: :class:`SearchResult` and the Gaussian approximation of its probabilities;
* ``moments``: the closed-form and Monte Carlo moments above;
* ``faiss_backend``: building, training, removing from and moving the FAISS index;
* ``storage``: the safetensors file format;
* ``inputs``: checking and batching what users pass; ``locking``: the readers-writer lock.
"""

from .result import SearchResult
from .storage import FORMAT_VERSION
from .uncertain_index import PosteriorLike, UncertainIndex

__all__ = ["FORMAT_VERSION", "PosteriorLike", "SearchResult", "UncertainIndex"]
