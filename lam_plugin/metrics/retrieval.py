"""Retrieval metrics: mAP@k and recall@k, each item querying all the others."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .inputs import ArrayLike, as_float_array, as_labels, check_at_least_two, check_k
from .neighbours import knn

__all__ = ["map_at_k", "recall_at_k", "retrieval_metrics"]

logger = logging.getLogger(__name__)


def retrieval_metrics(embeddings: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """mAP@k and recall@k for several ``k`` from one leave-one-out neighbour search.

    Each item queries all the other items, ranked by Euclidean distance on
    ``embeddings`` (ties: smaller index first). For a query with ``P`` positives
    (other items with its label) and hits ``h_r`` at ranks ``r = 1..k``::

        AP@k = sum_r h_r * (h_1 + ... + h_r) / r / min(P, k)
        recall@k = 1 if any h_r else 0

    and both are averaged over the queries. mAP@1 therefore equals recall@1.

    Queries without any positive are excluded from both means (a warning is
    logged). This differs from the paper's code, which scores such a query as
    AP = 1 and so inflates mAP whenever singleton classes exist.

    Args:
        embeddings: ``[N, D]`` (mean) embeddings.
        labels: ``[N]`` class labels.
        ks: the cut-offs, each ``1 <= k < N``.

    Returns:
        ``{"map@k": ..., "recall@k": ...}`` for every ``k`` in ``ks``.

    Raises:
        ValueError: on invalid inputs, or when no query has a positive.
    """
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one cut-off")
    return _retrieval_metrics(embeddings, labels, ks, "each entry of ks")


def _retrieval_metrics(embeddings: ArrayLike, labels: ArrayLike, ks: tuple[int, ...], k_name: str) -> dict[str, float]:
    x = as_float_array(embeddings, "embeddings", "[N, D]")
    n = x.shape[0]
    check_at_least_two(n, "embeddings")
    y = as_labels(labels, n, "embeddings")
    for k in ks:
        check_k(k, n, k_name)

    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    positives = counts[codes] - 1
    valid = positives > 0
    if not valid.any():
        raise ValueError("labels: no query has a positive (every label occurs once); retrieval metrics are undefined")
    if not valid.all():
        logger.warning("%d of %d queries have no positive and are excluded from mAP@k / recall@k", (~valid).sum(), n)

    k_max = max(ks)
    hits = (codes[knn(x, k_max)] == codes[:, None])[valid]  # [Q, k_max]
    positives = positives[valid]
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, k_max + 1)
    result: dict[str, float] = {}
    for k in ks:
        ap = (precision_at_rank[:, :k] * hits[:, :k]).sum(axis=1) / np.minimum(positives, k)
        result[f"map@{k}"] = float(ap.mean())
        result[f"recall@{k}"] = float(hits[:, :k].any(axis=1).mean())
    return result


def map_at_k(embeddings: ArrayLike, labels: ArrayLike, k: int) -> float:
    """Mean average precision at ``k``; see :func:`retrieval_metrics` for the definition.

    Queries without positives are excluded from the mean (the paper's code gives
    them AP = 1); ``ValueError`` if no query has a positive.
    """
    return _retrieval_metrics(embeddings, labels, (k,), "k")[f"map@{k}"]


def recall_at_k(embeddings: ArrayLike, labels: ArrayLike, k: int) -> float:
    """Share of queries with at least one positive among their ``k`` nearest others.

    See :func:`retrieval_metrics`; queries without positives are excluded, so
    ``recall_at_k(..., 1) == map_at_k(..., 1)``.
    """
    return _retrieval_metrics(embeddings, labels, (k,), "k")[f"recall@{k}"]
