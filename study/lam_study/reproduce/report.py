"""What a run writes besides its numbers: the markdown tables (the text of ``results.md``
around them is :mod:`~lam_study.reproduce.markdown`), the machine description, the
figures, and the JSON-safe form of ``results.json``."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .constants import METHOD_LABELS, METRIC_LABELS, METRICS, PAPER_FASHIONMNIST, _Stat
from .evaluation import _Curves


def _fmt(mean: float | None, std: float | None, decimals: int) -> str:
    if mean is None:
        return "—"
    if std is None:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _ours(stat: Mapping[str, float | None], n_seeds: int | None, decimals: int) -> str:
    """One of our cells: ``mean ± std``, or the mean alone when it comes from one seed (whose std of 0
    says nothing about the spread)."""
    return _fmt(stat.get("mean"), None if n_seeds == 1 else stat.get("std"), decimals)


def seed_counts(results: Mapping[str, Any]) -> dict[str, int]:
    """How many seeds each method of ``results`` is averaged over: a combined file's
    ``seeds_by_method`` (:mod:`lam_study.combine`), else ``seeds`` for every method."""
    by_method = results.get("seeds_by_method")
    if by_method is not None:
        return {m: len(s) for m, s in by_method.items()}
    return {m: len(results["seeds"]) for m in results["methods"]}


def results_table(
    methods: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    paper: Mapping[str, Mapping[str, _Stat | None]] | None = PAPER_FASHIONMNIST,
    decimals: int = 2,
    n_seeds: Mapping[str, int] | None = None,
) -> str:
    """A markdown table in the paper's layout: one row per method (this run, then the paper).

    Args:
        methods: ``results["methods"]``: ``name -> metric -> {"mean", "std"}``.
        paper: the paper's numbers (:data:`PAPER_FASHIONMNIST`), or None for ours only.
        decimals: digits after the point.
        n_seeds: seeds per method (:func:`seed_counts`); a method of one seed is shown without ± and
            its source reads "this run (1 seed)". None: every cell with its ±.
    """
    head = ["Method", "Source", *(METRIC_LABELS[m] for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + [":---:"] * len(METRICS)) + "|"]
    for name, row in methods.items():
        label = METHOD_LABELS.get(name, name)
        n = None if n_seeds is None else n_seeds.get(name)
        cells = [_ours(row.get(m, {}), n, decimals) for m in METRICS]
        lines.append("| " + " | ".join([label, "this run (1 seed)" if n == 1 else "this run", *cells]) + " |")
        if paper is not None and name in paper:
            ref = paper[name]
            cells = [_fmt(*(ref[m] or (None, None)), decimals) for m in METRICS]  # type: ignore[misc]
            lines.append("| " + " | ".join(["", "paper", *cells]) + " |")
    return "\n".join(lines)


def _per_seed_table(per_seed: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    head = ["Method", "Seed", *(METRIC_LABELS[m] for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + [":---:"] * len(METRICS)) + "|"]
    for name, seeds in per_seed.items():
        for seed, row in seeds.items():
            cells = [_fmt(row.get(m), None, 3) for m in METRICS]
            lines.append("| " + " | ".join([METHOD_LABELS.get(name, name), str(seed), *cells]) + " |")
    return "\n".join(lines)


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    where = info.get("cuda_device") or f"{info['cpu_count']} CPU cores ({info['torch_threads']} torch threads)"
    info["summary"] = f"{where}, torch {torch.__version__}"
    return info


def _plots(
    curves: Mapping[str, _Curves], per_seed_row: Mapping[str, Mapping[str, Any]], out: Path, seed: int, chance: float
) -> list[Path]:
    from .. import plots

    if not curves:
        return []
    label = {name: METHOD_LABELS.get(name, name) for name in curves}

    def metric(name: str) -> dict[str, float]:
        return {label[m]: per_seed_row[m][name] for m in curves if per_seed_row[m].get(name) is not None}

    suffix = f" (FashionMNIST → MNIST, seed {seed})"
    return [
        plots.plot_roc_curves(
            {label[m]: c.roc for m, c in curves.items()}, out / "roc.png", aucs=metric("auroc"), title="ROC" + suffix
        ),
        plots.plot_pr_curves(
            {label[m]: c.pr for m, c in curves.items()}, out / "pr.png", aucs=metric("auprc"),
            chance=chance, title="Precision-recall" + suffix,
        ),
        plots.plot_sparsification_curves(
            {label[m]: c.sparsification for m, c in curves.items()}, out / "sparsification.png",
            auscs=metric("ausc"), title="Sparsification" + suffix,
        ),
        plots.plot_reliability_diagrams(
            {label[m]: c.reliability for m, c in curves.items()}, out / "reliability.png", eces=metric("ece"),
            title="Reliability" + suffix,
        ),
    ]


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, tuples -> lists, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
