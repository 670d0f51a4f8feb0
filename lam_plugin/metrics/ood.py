"""Out-of-distribution detection: AUROC and AUPRC of an uncertainty score, OoD being
the positive class, and the ROC and precision-recall curves behind them."""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
from sklearn import metrics as skm

from .inputs import ArrayLike, as_float_array


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


def _ood_problem(scores_id: ArrayLike, scores_ood: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = as_float_array(scores_id, "scores_id", "[N]")
    b = as_float_array(scores_ood, "scores_ood", "[M]")
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
