"""The sparsification curve (1-NN accuracy as the most uncertain queries are removed),
its oracle, and the area under it (AUSC).

The area is a hand-written trapezoid rule rather than ``sklearn.metrics.auc``: the
plug-in must install and run without scikit-learn (and its SciPy)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .inputs import ArrayLike, as_float_array, as_labels, check_at_least_two
from .neighbours import knn

__all__ = ["SparsificationCurve", "ausc", "sparsification_curve"]

# The sparsification curve removes 0, 1, ..., 98 percent of the queries.
_SPARSIFICATION_STEPS = 99


class SparsificationCurve(NamedTuple):
    """Accuracy after removing the most uncertain ``fractions`` of the queries.

    Attributes:
        fractions: ``[99]`` share of queries removed, ``i / 100`` for ``i = 0..98``.
        accuracy: ``[99]`` 1-NN accuracy of the kept queries, ordered by the model's uncertainty.
        oracle_accuracy: ``[99]`` the same when the incorrect queries are removed first.
    """

    fractions: np.ndarray
    accuracy: np.ndarray
    oracle_accuracy: np.ndarray


def _kept_accuracy(correct: np.ndarray, uncertainty: np.ndarray) -> np.ndarray:
    n = correct.size
    order = np.argsort(uncertainty, kind="stable")  # least uncertain first, ties by index
    hits = np.cumsum(correct[order])
    kept = n - (np.arange(_SPARSIFICATION_STEPS) * n) // 100
    return hits[kept - 1] / kept


def sparsification_curve(mean: ArrayLike, std: ArrayLike, labels: ArrayLike) -> SparsificationCurve:
    """1-NN accuracy as the most uncertain queries are removed.

    Every query is matched to its nearest other item on ``mean`` (Euclidean,
    ties: smaller index); it is correct when the labels agree. Its uncertainty
    is ``mean_d(std[query, d] + std[neighbour, d])``. For ``i = 0..98`` the
    ``floor(i * N / 100)`` most uncertain queries are removed, i.e. the
    ``N - floor(i * N / 100)`` least uncertain are kept, and the accuracy of
    those is recorded. Equal uncertainties are ordered stably: the query with
    the smaller index counts as less uncertain and is removed later. The oracle
    curve uses ``1 - correct`` as the uncertainty.

    Args:
        mean: ``[N, D]`` mean embeddings, ``N >= 2``.
        std: ``[N, D]`` non-negative per-dimension standard deviations.
        labels: ``[N]`` class labels.
    """
    m = as_float_array(mean, "mean", "[N, D]")
    n = m.shape[0]
    check_at_least_two(n, "mean")
    sd = as_float_array(std, "std", "[N, D]")
    if sd.shape != m.shape:
        raise ValueError(f"std must have the shape of mean {tuple(m.shape)}, got {tuple(sd.shape)}")
    if (sd < 0).any():
        raise ValueError("std must be non-negative")
    y = as_labels(labels, n, "mean")

    neighbour = knn(m, 1)[:, 0]
    correct = y[neighbour] == y
    uncertainty = (sd + sd[neighbour]).mean(axis=1)
    return SparsificationCurve(
        fractions=np.arange(_SPARSIFICATION_STEPS) / 100,
        accuracy=_kept_accuracy(correct, uncertainty),
        oracle_accuracy=_kept_accuracy(correct, 1.0 - correct),
    )


def ausc(mean: ArrayLike, std: ArrayLike, labels: ArrayLike) -> float:
    """Area under the sparsification curve (see :func:`sparsification_curve`).

    Trapezoid rule over the 99 accuracies with spacing ``1 / 99`` (as the
    paper's ``np.trapz(accuracy, dx=1/99)``), so a flat curve at accuracy ``a``
    has area ``a * 98 / 99``.
    """
    accuracy = sparsification_curve(mean, std, labels).accuracy
    dx = np.diff(np.arange(_SPARSIFICATION_STEPS) / _SPARSIFICATION_STEPS)
    return float(np.sum(dx * (accuracy[1:] + accuracy[:-1]) / 2.0))
