"""Retrieval, out-of-distribution and calibration metrics for embedding models.

The metrics follow "Bayesian Metric Learning for Uncertainty Quantification in
Image Retrieval" (NeurIPS 2023); where this module deliberately departs from the
paper's code the function docstring says so.

Conventions shared by every function:

* Inputs are ``torch.Tensor`` (any device; gradients are ignored) or anything
  ``numpy.asarray`` accepts. Values are converted to float64 numpy arrays;
  scalar results are Python ``float``; curves are numpy arrays wrapped in small
  ``NamedTuple`` classes, so they unpack like tuples.
* Inputs are validated: wrong ``ndim``, mismatched lengths, empty inputs, NaN or
  infinite values and out-of-range parameters raise ``ValueError`` (``TypeError``
  for non-numeric data) naming the offending argument.
* Retrieval is leave-one-out: every item queries all the *other* items, ranked
  by Euclidean distance. Candidates are ranked by ``|x|^2 - 2 q.x`` (the squared
  distance less the query's constant ``|q|^2``) in float64, block by block, so
  memory stays at ``O(N * D + block)`` even for ``N = 70,000``. Ties in that
  quantity are broken by the smaller item index, so rankings are deterministic.
* Out-of-distribution (OoD) detection treats OoD as the positive class (label 1)
  and in-distribution as 0; a higher score means "more uncertain".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, NamedTuple, Union

import numpy as np
import torch
from sklearn import metrics as skm

logger = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float], Sequence[int]]

# Number of query-to-item distances held at once by the blocked k-NN search
# (2**22 float64 values = 32 MiB per block, plus the workspace of torch.topk).
_BLOCK_ELEMENTS = 1 << 22

# The sparsification curve removes 0, 1, ..., 98 percent of the queries.
_SPARSIFICATION_STEPS = 99


class RocCurve(NamedTuple):
    """Receiver operating characteristic, as returned by ``sklearn.metrics.roc_curve``."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


class PrCurve(NamedTuple):
    """Precision-recall curve, as returned by ``sklearn.metrics.precision_recall_curve``."""

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray


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


# --------------------------------------------------------------------------- validation


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # numpy has no bfloat16
        return t.numpy()
    return np.asarray(x)


def _as_float_array(x: ArrayLike, name: str, shape: str, *, cast: bool = True) -> np.ndarray:
    """``x`` as a finite, non-empty real array with ``shape.count(',') + 1`` dimensions.

    With ``cast`` the result is float64; without, the input dtype is kept (no copy).
    """
    arr = _to_numpy(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    ndim = shape.count(",") + 1
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape} ({ndim}-D), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must not contain NaN or infinite values")
    return arr.astype(np.float64, copy=False) if cast else arr


def _as_labels(labels: ArrayLike, n: int, n_name: str) -> np.ndarray:
    arr = _to_numpy(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must have shape [N] (1-D), got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise ValueError(f"labels must have one entry per row of {n_name} ({n}), got {arr.shape[0]}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError("labels must not contain NaN values")
    return arr


def _check_at_least_two(n: int, name: str) -> None:
    if n < 2:
        raise ValueError(f"{name} must have at least 2 rows for leave-one-out retrieval, got {n}")


def _check_k(k: int, n: int, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"{name} must satisfy 1 <= k < N = {n} (each query has N - 1 others), got {k}")


# --------------------------------------------------------------------------- k-NN search


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


def _knn(x: np.ndarray, k: int, chunk_size: int | None = None) -> np.ndarray:
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
    x = _as_float_array(embeddings, "embeddings", "[N, D]")
    _check_at_least_two(x.shape[0], "embeddings")
    _check_k(k, x.shape[0])
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return _knn(x, k, chunk_size)


# --------------------------------------------------------------------------- retrieval


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
    x = _as_float_array(embeddings, "embeddings", "[N, D]")
    n = x.shape[0]
    _check_at_least_two(n, "embeddings")
    y = _as_labels(labels, n, "embeddings")
    for k in ks:
        _check_k(k, n, k_name)

    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    positives = counts[codes] - 1
    valid = positives > 0
    if not valid.any():
        raise ValueError("labels: no query has a positive (every label occurs once); retrieval metrics are undefined")
    if not valid.all():
        logger.warning("%d of %d queries have no positive and are excluded from mAP@k / recall@k", (~valid).sum(), n)

    k_max = max(ks)
    hits = (codes[_knn(x, k_max)] == codes[:, None])[valid]  # [Q, k_max]
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


# --------------------------------------------------------------------------- OoD detection


def _ood_problem(scores_id: ArrayLike, scores_ood: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = _as_float_array(scores_id, "scores_id", "[N]")
    b = _as_float_array(scores_ood, "scores_ood", "[M]")
    target = np.concatenate([np.zeros(a.size, dtype=np.int64), np.ones(b.size, dtype=np.int64)])
    return target, np.concatenate([a, b])


def auroc(scores_id: ArrayLike, scores_ood: ArrayLike) -> float:
    """Area under the ROC curve for detecting OoD (positive) from in-distribution scores.

    ``sklearn.metrics.roc_auc_score``; tied scores count one half.
    """
    return float(skm.roc_auc_score(*_ood_problem(scores_id, scores_ood)))


def auprc(
    scores_id: ArrayLike, scores_ood: ArrayLike, *, integration: Literal["step", "trapezoid"] = "step"
) -> float:
    """Area under the precision-recall curve with OoD as the positive class.

    ``integration="step"`` (the default) is ``sklearn.metrics.average_precision_score``,
    the step-wise sum ``sum_n (R_n - R_{n-1}) P_n`` over the operating points.

    ``integration="trapezoid"`` is the number the paper's code reports: torchmetrics'
    ``AUC(reorder=True)`` over the ``PrecisionRecallCurve`` of its time, which stopped
    at the highest threshold that reaches full recall (the lower ones add only false
    positives). So: the points of :func:`pr_curve` from that threshold up, sorted by
    recall (stably, so points of equal recall keep their order), joined by straight
    lines. A straight line between two operating points is not an achievable detector,
    so this area can differ from the average precision either way.

    The chance level of the average precision is ``M / (N + M)``.
    """
    if integration not in ("step", "trapezoid"):
        raise ValueError(f"integration must be 'step' or 'trapezoid', got {integration!r}")
    target, scores = _ood_problem(scores_id, scores_ood)
    if integration == "step":
        return float(skm.average_precision_score(target, scores))
    precision, recall, _ = skm.precision_recall_curve(target, scores)  # recall non-increasing
    first = np.count_nonzero(recall == 1.0) - 1  # the highest threshold with full recall
    precision, recall = precision[first:], recall[first:]
    order = np.argsort(recall, kind="stable")
    return float(skm.auc(recall[order], precision[order]))


def roc_curve(scores_id: ArrayLike, scores_ood: ArrayLike) -> RocCurve:
    """False- and true-positive rates over thresholds (``sklearn.metrics.roc_curve``), for plotting."""
    return RocCurve(*skm.roc_curve(*_ood_problem(scores_id, scores_ood)))


def pr_curve(scores_id: ArrayLike, scores_ood: ArrayLike) -> PrCurve:
    """Precision and recall over thresholds (``sklearn.metrics.precision_recall_curve``), for plotting."""
    return PrCurve(*skm.precision_recall_curve(*_ood_problem(scores_id, scores_ood)))


# --------------------------------------------------------------------------- sparsification


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
    m = _as_float_array(mean, "mean", "[N, D]")
    n = m.shape[0]
    _check_at_least_two(n, "mean")
    sd = _as_float_array(std, "std", "[N, D]")
    if sd.shape != m.shape:
        raise ValueError(f"std must have the shape of mean {tuple(m.shape)}, got {tuple(sd.shape)}")
    if (sd < 0).any():
        raise ValueError("std must be non-negative")
    y = _as_labels(labels, n, "mean")

    neighbour = _knn(m, 1)[:, 0]
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
    return float(skm.auc(np.arange(_SPARSIFICATION_STEPS) / _SPARSIFICATION_STEPS, accuracy))


# --------------------------------------------------------------------------- calibration


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
    x = _as_float_array(samples, "samples", "[S, N, D]", cast=False)
    n_samples, n = x.shape[:2]
    _check_at_least_two(n, "samples (dimension N)")
    y = _as_labels(labels, n, "samples (dimension N)")
    classes, codes = np.unique(y, return_inverse=True)  # sorted: the smallest code is the smallest label
    votes = np.stack([codes[_knn(x[s].astype(np.float64), 1)[:, 0]] for s in range(n_samples)])
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
