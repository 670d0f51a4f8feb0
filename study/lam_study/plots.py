"""Figures of the paper's evaluation: ROC, precision-recall, sparsification and reliability.

Every function takes one curve per method (the objects returned by
:mod:`lam_plugin.metrics`: :class:`~lam_plugin.metrics.RocCurve`,
:class:`~lam_plugin.metrics.PrCurve`, :class:`~lam_plugin.metrics.SparsificationCurve`,
:class:`~lam_plugin.metrics.ReliabilityDiagram`), keyed by the label to show, draws all
methods into one figure and writes it as a PNG.

Figures are built on :class:`matplotlib.figure.Figure` directly with the Agg canvas, so
nothing here touches ``pyplot`` or the process-wide matplotlib backend. matplotlib is an
optional dependency (``pip install lam-plugin[plots]``); it is imported only when a
figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from lam_plugin.metrics import PrCurve, ReliabilityDiagram, RocCurve, SparsificationCurve

__all__ = [
    "plot_pr_curves",
    "plot_reliability_diagrams",
    "plot_roc_curves",
    "plot_sparsification_curves",
]

PathLike = str | Path


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'lam-plugin[plots]'") from err
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _check_curves(curves: Mapping[str, Any]) -> None:
    if not curves:
        raise ValueError("no curve to plot: pass at least one method")


def _suffix(values: Mapping[str, float] | None, label: str, name: str) -> str:
    if values is None or label not in values or values[label] is None:
        return label
    return f"{label} ({name} {values[label]:.3f})"


def plot_roc_curves(
    curves: Mapping[str, RocCurve],
    path: PathLike,
    *,
    aucs: Mapping[str, float] | None = None,
    title: str = "OoD detection: ROC",
) -> Path:
    """ROC curves (false- against true-positive rate, OoD = positive) of every method.

    Args:
        curves: label -> :class:`~lam_plugin.metrics.RocCurve`.
        path: the PNG to write.
        aucs: label -> AUROC, shown in the legend when given.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_curves(curves)
    fig = _figure(5.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for colour, (label, curve) in zip(_colours(len(curves)), curves.items()):
        ax.plot(curve.fpr, curve.tpr, color=colour, lw=1.6, label=_suffix(aucs, label, "AUROC"))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
    _finish(ax, "false-positive rate", "true-positive rate", title, (0, 1), (0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr_curves(
    curves: Mapping[str, PrCurve],
    path: PathLike,
    *,
    aucs: Mapping[str, float] | None = None,
    chance: float | None = None,
    title: str = "OoD detection: precision-recall",
) -> Path:
    """Precision-recall curves (OoD = positive) of every method.

    Args:
        curves: label -> :class:`~lam_plugin.metrics.PrCurve`.
        path: the PNG to write.
        aucs: label -> AUPRC, shown in the legend when given.
        chance: the precision of a random score (share of OoD items), drawn as a line.
        title: figure title.
    """
    _check_curves(curves)
    fig = _figure(5.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for colour, (label, curve) in zip(_colours(len(curves)), curves.items()):
        ax.step(curve.recall, curve.precision, where="post", color=colour, lw=1.6, label=_suffix(aucs, label, "AUPRC"))
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
    _finish(ax, "recall", "precision", title, (0, 1), (0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_sparsification_curves(
    curves: Mapping[str, SparsificationCurve],
    path: PathLike,
    *,
    auscs: Mapping[str, float] | None = None,
    title: str = "Sparsification (1-NN accuracy)",
) -> Path:
    """Accuracy of the kept queries as the most uncertain are removed, with each oracle.

    Each method's curve is solid; its oracle (incorrect queries removed first, which
    depends on that method's own 1-NN results) is dashed in the same colour. A
    well-ranked uncertainty gives a curve that rises monotonically towards its oracle.

    Args:
        curves: label -> :class:`~lam_plugin.metrics.SparsificationCurve`.
        path: the PNG to write.
        auscs: label -> AUSC, shown in the legend when given.
        title: figure title.
    """
    _check_curves(curves)
    fig = _figure(5.6, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    low = 1.0
    for colour, (label, curve) in zip(_colours(len(curves)), curves.items()):
        percent = 100 * np.asarray(curve.fractions)
        ax.plot(percent, curve.accuracy, color=colour, lw=1.6, label=_suffix(auscs, label, "AUSC"))
        ax.plot(percent, curve.oracle_accuracy, color=colour, lw=1.0, ls="--")
        low = min(low, float(np.min(curve.accuracy)), float(np.min(curve.oracle_accuracy)))
    ax.plot([], [], color="grey", lw=1.0, ls="--", label="oracle (same colour)")
    _finish(ax, "most uncertain queries removed (%)", "accuracy of the rest", title, (0, 100), (max(0.0, low - 0.02), 1.005))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability_diagrams(
    diagrams: Mapping[str, ReliabilityDiagram],
    path: PathLike,
    *,
    eces: Mapping[str, float] | None = None,
    title: str = "Calibration of the sampled 1-NN classifier",
) -> Path:
    """One reliability diagram per method, side by side.

    Bars: accuracy of each confidence bin (empty bins are left out), drawn at the bin's
    mean confidence, with the share of queries in each bin printed above the bar; the
    diagonal is perfect calibration.

    Args:
        diagrams: label -> :class:`~lam_plugin.metrics.ReliabilityDiagram`.
        path: the PNG to write.
        eces: label -> ECE, shown in each panel title when given.
        title: figure title.
    """
    _check_curves(diagrams)
    n = len(diagrams)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(3.4 * cols, 3.3 * rows)
    for k, (colour, (label, diagram)) in enumerate(zip(_colours(n), diagrams.items())):
        ax = fig.add_subplot(rows, cols, k + 1)
        count = np.asarray(diagram.bin_count, dtype=float)
        bins = count.size
        edges = np.linspace(0.0, 1.0, bins + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        filled = count > 0
        acc = np.where(filled, diagram.bin_accuracy, 0.0)
        ax.bar(centres[filled], acc[filled], width=1.0 / bins, color=colour, alpha=0.75, edgecolor="black", lw=0.5)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        conf = np.asarray(diagram.bin_confidence)
        ax.plot(conf[filled], acc[filled], "o", color="black", ms=3)
        total = count.sum()
        for centre, a, c in zip(centres[filled], acc[filled], count[filled]):
            ax.text(centre, min(a + 0.02, 0.97), f"{100 * c / total:.0f}%", ha="center", fontsize=6)
        head = label if eces is None or eces.get(label) is None else f"{label} (ECE {eces[label]:.3f})"
        _finish(ax, "confidence", "accuracy", head, (0, 1), (0, 1))
        ax.title.set_fontsize(9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _finish(ax: Axes, xlabel: str, ylabel: str, title: str, xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, lw=0.5)
