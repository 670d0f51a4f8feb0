"""Evaluation of a fitted method: its predictions on the test split and the OoD set,
the protocol's metrics and curves, the validation of post-hoc priors, and the mean and
std over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lam_plugin import metrics as M
from lam_plugin.posterior import EmbeddingPosterior
from lam_plugin.prediction import Prediction

from ..training import seeded
from .config import SUPPLEMENTARY_METRICS, UNCERTAINTY_METRICS, ReproduceConfig
from .protocol import _Tensors
from .runner import _Method, _posterior_predict


def _predict_all(
    method: _Method, x: Tensor, keep_samples: bool, chunk: int, desc: str, progress: bool
) -> Prediction:
    means, stds, samples, output_vars = [], [], [], []
    for start in tqdm(range(0, x.shape[0], chunk), desc=desc, leave=False, disable=not progress):
        pred = method.predict(x[start : start + chunk], keep_samples)
        means.append(pred.mean.detach().cpu())
        stds.append(pred.std.detach().cpu())
        if pred.output_var is not None:
            output_vars.append(pred.output_var.detach().cpu())
        if keep_samples:
            if pred.samples is None:
                raise RuntimeError(f"{method.name} returned no samples")
            samples.append(pred.samples.detach().cpu())
    return Prediction(
        mean=torch.cat(means),
        std=torch.cat(stds),
        samples=torch.cat(samples, dim=1) if keep_samples else None,
        output_var=torch.cat(output_vars) if len(output_vars) == len(means) else None,
    )


@dataclass
class _Curves:
    roc: M.RocCurve
    pr: M.PrCurve
    sparsification: M.SparsificationCurve
    reliability: M.ReliabilityDiagram


def _evaluate(
    method: _Method, data: _Tensors, config: ReproduceConfig, seed: int, want_curves: bool, progress: bool
) -> tuple[dict[str, float | None], _Curves | None]:
    chunk = config.eval_batch_size
    with seeded(20_000 + seed):
        pred = _predict_all(method, data.test_x, method.uncertain, chunk, f"{method.name}: test", progress)
        pred_ood = (
            _predict_all(method, data.ood_x, False, chunk, f"{method.name}: OoD", progress) if method.uncertain else None
        )
    n = len(data.test_y)
    ks = tuple(k for k in (1, 5, 10) if k < n)
    row: dict[str, float | None] = dict(M.retrieval_metrics(pred.mean, data.test_y, ks=ks))
    for k in (1, 5, 10):
        row.setdefault(f"map@{k}", None)
    curves = None
    if method.uncertain and pred_ood is not None:
        unc_id, unc_ood = pred.uncertainty, pred_ood.uncertainty
        votes = M.nearest_neighbour_votes(pred.samples, data.test_y)  # the costly part of the ECE, done once
        row["auroc"] = M.auroc(unc_id, unc_ood)
        row["auprc"] = M.auprc(unc_id, unc_ood)
        row["ausc"] = M.ausc(pred.mean, pred.std, data.test_y)
        row["ece"] = votes.ece()
        # the paper's code's conventions, supplementary
        row["auprc_trapezoid"] = M.auprc(unc_id, unc_ood, integration="trapezoid")
        row["ece_certain_dropped"] = (
            votes.ece(certain="dropped") if bool((votes.agreeing < votes.n_samples).any()) else None
        )
        row["uncertainty_id_mean"] = float(unc_id.mean())
        row["uncertainty_ood_mean"] = float(unc_ood.mean())
        row["n_samples"] = int(pred.samples.shape[0]) if pred.samples is not None else None
        out_id, out_ood = pred.output_uncertainty, pred_ood.output_uncertainty
        if out_id is not None and out_ood is not None:  # supplementary: the pre-normalisation score
            row["auroc_output_var"] = M.auroc(out_id, out_ood)
            row["auprc_output_var"] = M.auprc(out_id, out_ood)
        if want_curves:
            curves = _Curves(
                roc=M.roc_curve(unc_id, unc_ood),
                pr=M.pr_curve(unc_id, unc_ood),
                sparsification=M.sparsification_curve(pred.mean, pred.std, data.test_y),
                reliability=votes.reliability_diagram(),
            )
    else:
        for metric in UNCERTAINTY_METRICS:
            row[metric] = None
    return row, curves


def _validate_posterior(
    posterior: EmbeddingPosterior, data: _Tensors, config: ReproduceConfig, seed: int, progress: bool
) -> dict[str, float]:
    method = _Method("lam_posthoc", _posterior_predict(posterior, config.n_samples, seed))
    pred = _predict_all(method, data.val_x, True, config.eval_batch_size, "lam_posthoc: validation", progress)
    return {
        "ece": M.ece(pred.samples, data.val_y),
        "ausc": M.ausc(pred.mean, pred.std, data.val_y),
        "map@1": M.map_at_k(pred.mean, data.val_y, 1),
        "uncertainty_mean": float(pred.uncertainty.mean()),
    }


def _choose_prior(validation: Mapping[int, Mapping[str, Mapping[str, float]]]) -> str:
    """The candidate with the lowest mean validation ECE (ties: the higher mean AUSC)."""
    names = list(next(iter(validation.values())))

    def key(name: str) -> tuple[float, float]:
        ece = float(np.mean([v[name]["ece"] for v in validation.values()]))
        ausc = float(np.mean([v[name]["ausc"] for v in validation.values()]))
        return (round(ece, 12), -ausc)

    return min(names, key=key)


def _aggregate(values: Sequence[float | None]) -> dict[str, float | None]:
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return {"mean": None, "std": None}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std())}


def supplementary_summary(
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Mean and std over the seeds of each of :data:`SUPPLEMENTARY_METRICS`, per method.

    ``rows``: method -> its per-seed result rows. A metric missing on any seed (an
    older run, or an ECE with every query certain) has mean and std ``None``; a
    method with none of them is left out.
    """
    summary = {}
    for name, seed_rows in rows.items():
        stats = {k: _aggregate([row.get(k) for row in seed_rows]) for k in SUPPLEMENTARY_METRICS}
        if any(v["mean"] is not None for v in stats.values()):
            summary[name] = stats
    return summary
