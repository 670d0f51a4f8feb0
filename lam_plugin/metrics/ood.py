"""Out-of-distribution detection: AUROC and AUPRC of an uncertainty score, OoD being
the positive class, and the ROC and precision-recall curves behind them.

The curves and areas are written here in numpy rather than taken from scikit-learn:
the plug-in must install and run without scikit-learn (and its SciPy). They follow
``sklearn.metrics`` (``roc_curve``, ``precision_recall_curve``, ``roc_auc_score``,
``average_precision_score``, ``auc``) operating point for operating point, and the
tests compare them with it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from .inputs import ArrayLike, as_float_array

__all__ = ["PrCurve", "RocCurve", "auprc", "auroc", "pr_curve", "roc_curve"]


class RocCurve(NamedTuple):
    """Receiver operating characteristic, as ``sklearn.metrics.roc_curve`` returns it."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


class PrCurve(NamedTuple):
    """Precision-recall curve, as ``sklearn.metrics.precision_recall_curve`` returns it."""

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray


def _ood_problem(scores_id: ArrayLike, scores_ood: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = as_float_array(scores_id, "scores_id", "[N]")
    b = as_float_array(scores_ood, "scores_ood", "[M]")
    target = np.concatenate([np.zeros(a.size, dtype=np.int64), np.ones(b.size, dtype=np.int64)])
    return target, np.concatenate([a, b])


def _counts_at_thresholds(target: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positives when every distinct score, highest first, is the threshold.

    A sample is flagged positive when its score is ``>=`` the threshold, so tied scores
    enter together: one operating point per distinct score (``fps``, ``tps`` as float64).
    """
    order = np.argsort(scores, kind="stable")[::-1]
    scores, target = scores[order], target[order]
    # the last sample of every run of equal scores, in descending score order
    last = np.append(np.flatnonzero(np.diff(scores)), scores.size - 1)
    tps = np.cumsum(target, dtype=np.float64)[last]
    fps = (last + 1) - tps
    return fps, tps, scores[last]


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid rule for ``y`` over ``x`` (``x`` sorted ascending)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _roc(target: np.ndarray, scores: np.ndarray) -> RocCurve:
    fps, tps, thresholds = _counts_at_thresholds(target, scores)
    if fps.size > 2:  # drop the points collinear with their neighbours, as scikit-learn does
        corner = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))
        keep = np.flatnonzero(np.concatenate([[True], corner, [True]]))
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    # start at (0, 0): no sample is above an infinite threshold
    fps, tps = np.concatenate([[0.0], fps]), np.concatenate([[0.0], tps])
    thresholds = np.concatenate([[np.inf], thresholds])
    return RocCurve(fps / fps[-1], tps / tps[-1], thresholds)  # both classes are non-empty


def _pr(target: np.ndarray, scores: np.ndarray) -> PrCurve:
    fps, tps, thresholds = _counts_at_thresholds(target, scores)
    precision = tps / (tps + fps)  # tps + fps >= 1 at every threshold
    recall = tps / tps[-1]  # scores_ood is non-empty, so tps[-1] >= 1
    # lowest threshold first (recall non-increasing), ending at the point (recall 0, precision 1)
    return PrCurve(np.append(precision[::-1], 1.0), np.append(recall[::-1], 0.0), thresholds[::-1])


def auroc(scores_id: ArrayLike, scores_ood: ArrayLike) -> float:
    """Area under the ROC curve for detecting OoD (positive) from in-distribution scores.

    As ``sklearn.metrics.roc_auc_score``: the trapezoid rule over :func:`roc_curve`, so
    an OoD score tied with an in-distribution score counts one half.
    """
    fpr, tpr, _ = _roc(*_ood_problem(scores_id, scores_ood))
    return _trapezoid(fpr, tpr)


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
    precision, recall, _ = _pr(*_ood_problem(scores_id, scores_ood))  # recall non-increasing
    if integration == "step":
        # the last precision is 1 at recall 0; max() turns a rounding -0.0 into 0.0
        return max(0.0, float(-np.sum(np.diff(recall) * precision[:-1])))
    first = np.count_nonzero(recall == 1.0) - 1  # the highest threshold with full recall
    precision, recall = precision[first:], recall[first:]
    order = np.argsort(recall, kind="stable")
    return _trapezoid(recall[order], precision[order])


def roc_curve(scores_id: ArrayLike, scores_ood: ArrayLike) -> RocCurve:
    """False- and true-positive rates over thresholds, for plotting.

    As ``sklearn.metrics.roc_curve``: thresholds are the distinct scores, highest first,
    after a first threshold ``inf`` (the point (0, 0)); a sample counts as positive when
    its score is ``>=`` the threshold; points collinear with their neighbours are left out.
    """
    return _roc(*_ood_problem(scores_id, scores_ood))


def pr_curve(scores_id: ArrayLike, scores_ood: ArrayLike) -> PrCurve:
    """Precision and recall over thresholds, for plotting.

    As ``sklearn.metrics.precision_recall_curve``: thresholds are the distinct scores in
    increasing order, with one precision and recall each, and a last point (precision 1,
    recall 0) that has no threshold.
    """
    return _pr(*_ood_problem(scores_id, scores_ood))
