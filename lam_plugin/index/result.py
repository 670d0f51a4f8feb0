"""What a search returns: :class:`SearchResult`, and the Gaussian approximation behind
its probabilities.

A distance ``d^2`` (or similarity ``s``) with mean ``E`` and variance ``V`` is taken as
normal, ``N(E, V)``; ``d^2`` is really a generalised chi-square, so the approximation is
good when many dimensions contribute and poor in the far tails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SearchResult", "confidence_bound", "normal_cdf", "prob_within"]


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
            between the random query and neighbour embeddings (see :mod:`lam_plugin.index`).
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
        return prob_within(self.expected, self.variances, float(threshold), self.metric)

    def confidence_bound(self, z: float = 1.645) -> np.ndarray:
        """``[Q, k]`` the lower confidence bound of how near each neighbour is.

        ``E[d^2] + z sqrt(Var)`` for ``l2`` (``d^2`` is below it with probability about
        ``Phi(z)``), ``E[s] - z sqrt(Var)`` for ``ip``. A negative ``z`` gives the
        optimistic bound.
        """
        return confidence_bound(self.expected, self.variances, float(z), self.metric)

    def __len__(self) -> int:
        return self.ids.shape[0]


def normal_cdf(num: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``Phi(num / sqrt(var))`` elementwise; for ``var == 0`` the limit (0, 1/2 or 1), NaN for NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = num / np.sqrt(var)
        degenerate = var == 0  # NaN (empty slots) stays NaN
        ratio = np.where(degenerate, np.sign(num) * np.inf, ratio)
        ratio = np.where(degenerate & (num == 0), 0.0, ratio)
    return torch.special.ndtr(torch.from_numpy(np.asarray(ratio, dtype=np.float32))).numpy()


def prob_within(expected: np.ndarray, variances: np.ndarray, threshold: float, metric: str) -> np.ndarray:
    """``P(d^2 < threshold)`` for ``l2``, ``P(s > threshold)`` otherwise, elementwise."""
    gap = expected - threshold if metric != "l2" else threshold - expected
    return normal_cdf(gap, variances)


def confidence_bound(expected: np.ndarray, variances: np.ndarray, z: float, metric: str) -> np.ndarray:
    """``expected + z sqrt(variances)`` for ``l2``, ``expected - z sqrt(variances)`` otherwise."""
    spread = z * np.sqrt(variances)
    return expected - spread if metric != "l2" else expected + spread
