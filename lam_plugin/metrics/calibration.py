"""Calibration of the sample-wise 1-NN classifier: its votes, reliability diagram and
expected calibration error (ECE)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from .inputs import ArrayLike, as_float_array, as_labels, check_at_least_two
from .neighbours import knn

__all__ = ["Certain", "NearestNeighbourVotes", "ReliabilityDiagram", "ece", "nearest_neighbour_votes", "reliability_diagram"]


class ReliabilityDiagram(NamedTuple):
    """Per-bin summary of confidence against accuracy (``bins`` equal-width bins on ``[0, 1]``).

    Attributes:
        bin_confidence: ``[bins]`` mean confidence of the queries in each bin (NaN when empty).
        bin_accuracy: ``[bins]`` share of correct predictions in each bin (NaN when empty).
        bin_count: ``[bins]`` number of queries in each bin.
    """

    bin_confidence: np.ndarray
    bin_accuracy: np.ndarray
    bin_count: np.ndarray


def _mode(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of int ``votes [S, N]``: the most frequent value (ties: smallest) and its count."""
    s = votes.shape[0]
    ordered = np.sort(votes, axis=0)
    rank = np.arange(s)[:, None]
    starts = np.ones(ordered.shape, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = np.ones(ordered.shape, dtype=bool)
    ends[:-1] = starts[1:]
    # each position's run of equal values spans [first, last]; its length is the count
    first = np.maximum.accumulate(np.where(starts, rank, 0), axis=0)
    last = np.minimum.accumulate(np.where(ends, rank, s - 1)[::-1], axis=0)[::-1]
    count = last - first + 1
    best = np.argmax(count, axis=0)  # first maximum = smallest value, as ``ordered`` ascends
    columns = np.arange(votes.shape[1])
    return ordered[best, columns], count[best, columns]


Certain = Literal["last_bin", "dropped"]


def _check_binning(bins: int, certain: str) -> None:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    if certain not in ("last_bin", "dropped"):
        raise ValueError(f"certain must be 'last_bin' or 'dropped', got {certain!r}")


class NearestNeighbourVotes(NamedTuple):
    """The sample-wise 1-NN classifier behind the ECE, one entry per query.

    Made by :func:`nearest_neighbour_votes`; its reliability diagram and ECE can then
    be had under either convention without searching the neighbours again.

    Attributes:
        prediction: ``[N]`` the label most samples vote for (ties: the smallest label).
        agreeing: ``[N]`` how many of the ``n_samples`` samples vote for it.
        correct: ``[N]`` bool, the prediction equals the query's label.
        n_samples: the number of weight samples ``S``.
    """

    prediction: np.ndarray
    agreeing: np.ndarray
    correct: np.ndarray
    n_samples: int

    @property
    def confidence(self) -> np.ndarray:
        """``[N]`` share of samples that agree with the prediction, in ``(0, 1]``."""
        return self.agreeing / self.n_samples

    def reliability_diagram(self, bins: int = 10, *, certain: Certain = "last_bin") -> ReliabilityDiagram:
        """Bin the queries by confidence; see :func:`reliability_diagram`."""
        _check_binning(bins, certain)
        keep = self.agreeing < self.n_samples if certain == "dropped" else np.ones(self.agreeing.shape, dtype=bool)
        bin_index = np.minimum(self.agreeing[keep] * bins // self.n_samples, bins - 1)
        bin_count = np.bincount(bin_index, minlength=bins)
        filled = bin_count > 0
        bin_confidence = np.full(bins, np.nan)
        bin_accuracy = np.full(bins, np.nan)
        sums = np.bincount(bin_index, weights=self.confidence[keep], minlength=bins)
        hits = np.bincount(bin_index, weights=self.correct[keep], minlength=bins)
        bin_confidence[filled] = sums[filled] / bin_count[filled]
        bin_accuracy[filled] = hits[filled] / bin_count[filled]
        return ReliabilityDiagram(bin_confidence, bin_accuracy, bin_count)

    def ece(self, bins: int = 10, *, certain: Certain = "last_bin") -> float:
        """Expected calibration error; see :func:`ece`."""
        diagram = self.reliability_diagram(bins, certain=certain)
        if diagram.bin_count.sum() == 0:
            raise ValueError(
                "every query has confidence 1.0: with certain='dropped' no query is left to bin "
                "(the ECE is undefined; certain='last_bin' counts them)"
            )
        filled = diagram.bin_count > 0
        gaps = np.abs(diagram.bin_accuracy[filled] - diagram.bin_confidence[filled])
        return float((diagram.bin_count[filled] * gaps).sum() / diagram.bin_count.sum())


def nearest_neighbour_votes(samples: ArrayLike, labels: ArrayLike) -> NearestNeighbourVotes:
    """The sample-wise 1-NN classifier of the paper's ECE.

    For every weight sample ``s`` each query takes the label of its nearest
    other item among that sample's embeddings (Euclidean, ties: smaller index).
    The prediction is the mode of those labels over the samples (ties: the
    smallest label), the confidence the share of samples that agree with it,
    and the query is correct when the prediction equals its label. This is the
    costly part of the ECE (``S`` neighbour searches over ``N`` items).

    Args:
        samples: ``[S, N, D]`` embeddings of the ``N`` items under ``S`` weight samples.
        labels: ``[N]`` class labels.
    """
    # kept in the input dtype: each [N, D] sample is cast to float64 only when searched
    x = as_float_array(samples, "samples", "[S, N, D]", cast=False)
    n_samples, n = x.shape[:2]
    check_at_least_two(n, "samples (dimension N)")
    y = as_labels(labels, n, "samples (dimension N)")
    classes, codes = np.unique(y, return_inverse=True)  # sorted: the smallest code is the smallest label
    votes = np.stack([codes[knn(x[s].astype(np.float64), 1)[:, 0]] for s in range(n_samples)])
    prediction, agreeing = _mode(votes)
    return NearestNeighbourVotes(classes[prediction], agreeing, prediction == codes, n_samples)


def reliability_diagram(
    samples: ArrayLike, labels: ArrayLike, bins: int = 10, *, certain: Certain = "last_bin"
) -> ReliabilityDiagram:
    """Confidence against accuracy of the sample-wise 1-NN classifier (:func:`nearest_neighbour_votes`).

    Bins are ``[0, 1/B), [1/B, 2/B), ..., [(B-1)/B, 1]``: the last bin is closed,
    so confidence 1.0 counts in it (``certain="last_bin"``, the default). The
    paper's code instead leaves queries with confidence 1.0 out of every bin, and
    its ECE then weighs the bins by the queries left (``certain="dropped"``; for a
    narrow posterior, where most queries are certain, that is an ECE over a few
    hard queries). A confidence ``c / S`` goes to bin ``min(floor(c * B / S), B - 1)``
    in exact integer arithmetic, so values such as 0.7 are not pushed across a bin
    edge by rounding (the paper's code compares with float bin edges, where 0.3
    falls below the edge ``0.30000000000000004``; that rounding is not copied).

    Args:
        samples: ``[S, N, D]`` embeddings of the ``N`` items under ``S`` weight samples.
        labels: ``[N]`` class labels.
        bins: number of equal-width bins ``B`` on ``[0, 1]``.
        certain: ``"last_bin"`` or ``"dropped"``, where queries of confidence 1.0 go.
    """
    _check_binning(bins, certain)  # before the costly search
    return nearest_neighbour_votes(samples, labels).reliability_diagram(bins, certain=certain)


def ece(samples: ArrayLike, labels: ArrayLike, bins: int = 10, *, certain: Certain = "last_bin") -> float:
    """Expected calibration error ``sum_b (n_b / n) |acc_b - conf_b|`` over non-empty bins.

    ``n`` is the number of binned queries: all ``N`` by default, those with
    confidence below 1.0 with ``certain="dropped"`` (the paper's code), where a
    posterior with every query certain raises ``ValueError``. See
    :func:`reliability_diagram` for the classifier and the binning.
    """
    _check_binning(bins, certain)  # before the costly search
    return nearest_neighbour_votes(samples, labels).ece(bins, certain=certain)
