"""The steps of :func:`~lam_study.reproduce.reproduce_fashionmnist`, in order: train or
load every method (:func:`_fit_all`), choose the post-hoc prior (:func:`_choose_posthoc_prior`),
evaluate every method (:func:`_evaluate_all`), then the figures, the content of
``results.json`` (:func:`_results`) and the two result files (:func:`_write`)."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lam_plugin import __version__
from lam_plugin import metrics as M
from lam_plugin.posterior import EmbeddingPosterior

from ..training import seeded
from .config import DeviceUnavailableError, ReproduceConfig, _prior_name
from .constants import METRICS, PAPER_FASHIONMNIST
from .evaluation import (
    _aggregate,
    _choose_prior,
    _Curves,
    _evaluate,
    _predict_all,
    _validate_posterior,
    supplementary_summary,
)
from .markdown import _markdown
from .protocol import _Tensors
from .report import _json_safe, _machine, _plots
from .runner import _Method, _posterior_predict, _Runner

# the package's logger, so that log lines keep the name "lam_study.reproduce"
logger = logging.getLogger(__package__)

#: Per-seed rows of every method: ``method -> seed (str) -> metric -> value``.
_PerSeed = dict[str, dict[str, dict[str, Any]]]


@dataclass
class _Fitted:
    """The methods of a run once trained or loaded, and what their training measured.

    Attributes:
        built: ``method -> seed -> fitted method`` (post-hoc LAM once its prior is chosen).
        posthoc: ``seed -> prior candidate -> post-hoc posterior``.
        validation: ``seed -> prior candidate -> validation metrics`` of the post-hoc candidates.
        val_map: ``seed -> validation mAP@1`` of the deterministic network.
        timings: ``method -> {"train_s", "evaluate_s"}``.
    """

    built: dict[str, dict[int, _Method]]
    posthoc: dict[int, dict[str, EmbeddingPosterior]]
    validation: dict[int, dict[str, dict[str, float]]]
    val_map: dict[int, float]
    timings: dict[str, dict[str, float]]


def _usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`; :class:`DeviceUnavailableError` for CUDA without a usable device."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "device 'cuda' was asked for, but this torch build or machine has no usable CUDA device "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use device 'cpu'"
        )
    return device


def _fit_all(runner: _Runner, methods: list[str]) -> _Fitted:
    """Train or load every method for every seed; the post-hoc prior candidates are
    evaluated on the validation split, and so is the deterministic network (mAP@1)."""
    config, tensors, progress = runner.config, runner.data, runner.progress
    fitted = _Fitted(
        built={m: {} for m in methods},
        posthoc={},
        validation={},
        val_map={},
        timings={m: {"train_s": 0.0, "evaluate_s": 0.0} for m in methods},
    )
    bar = tqdm(total=len(methods) * len(config.seeds), desc="train", disable=not progress)
    for seed in config.seeds:
        for name in methods:
            bar.set_postfix(method=name, seed=seed)
            t0 = time.perf_counter()
            if name == "lam_posthoc":
                fitted.posthoc[seed] = runner.lam_posthoc_candidates(seed)
                if len(tensors.val_y) >= 2:
                    with seeded(30_000 + seed):
                        fitted.validation[seed] = {
                            c: _validate_posterior(p, tensors, config, seed, progress)
                            for c, p in fitted.posthoc[seed].items()
                        }
            else:
                fitted.built[name][seed] = runner.build(name, seed)
                if name == "deterministic" and len(tensors.val_y) >= 2:
                    fitted.val_map[seed] = _validation_map(fitted.built[name][seed], tensors, config, progress)
            fitted.timings[name]["train_s"] += time.perf_counter() - t0
            bar.update(1)
    bar.close()
    return fitted


def _validation_map(det: _Method, tensors: _Tensors, config: ReproduceConfig, progress: bool) -> float:
    """mAP@1 of the deterministic method ``det`` on the validation split."""
    pred = _predict_all(det, tensors.val_x, False, config.eval_batch_size, "deterministic: validation", progress)
    return M.map_at_k(pred.mean, tensors.val_y, 1)


def _choose_posthoc_prior(runner: _Runner, fitted: _Fitted) -> dict[str, Any]:
    """Choose the post-hoc LAM prior (on validation with ``prior_precision="auto"``, else the
    fixed one), put each seed's posterior of that prior into ``fitted.built``, and return
    ``results["lam_posthoc"]``: the choice, the candidates and their validation numbers."""
    config = runner.config
    if config.prior_precision == "auto":
        if not fitted.validation:
            raise ValueError("prior_precision='auto' needs a validation split of at least 2 images")
        chosen, selection = _choose_prior(fitted.validation), "validation"
    else:
        chosen, selection = _prior_name(config.prior_precision), "fixed"
    for seed in config.seeds:
        values = runner.prior_values[seed]
        fitted.built["lam_posthoc"][seed] = _Method(
            "lam_posthoc",
            _posterior_predict(fitted.posthoc[seed][chosen], config.n_samples, seed),
            info={"prior_precision": values[chosen]},
        )
    lam_info = {
        "prior_precision": chosen,
        "selection": selection,
        "candidates": [_prior_name(c) for c in config.candidates],
        "prior_values": {str(s): v for s, v in runner.prior_values.items()},
        "temperatures": {str(s): v for s, v in runner.temperatures.items()},
        "validation": {str(s): v for s, v in fitted.validation.items()},
        "curvature": {str(s): v for s, v in runner.curvature_stats.items()},
    }
    logger.info("post-hoc LAM prior precision: %s (%s)", chosen, selection)
    return lam_info


def _evaluate_all(runner: _Runner, fitted: _Fitted, methods: list[str]) -> tuple[_PerSeed, dict[str, _Curves]]:
    """Evaluate every method of every seed on the test split and the OoD set: the per-seed
    rows (with the methods' ``info_*``) and the curves of the first seed."""
    config, tensors, progress = runner.config, runner.data, runner.progress
    per_seed: _PerSeed = {m: {} for m in methods}
    curves: dict[str, _Curves] = {}
    first = config.seeds[0]
    bar = tqdm(total=len(methods) * len(config.seeds), desc="evaluate", disable=not progress)
    for seed in config.seeds:
        for name in methods:
            bar.set_postfix(method=name, seed=seed)
            t0 = time.perf_counter()
            method = fitted.built[name][seed]
            row, curve = _evaluate(method, tensors, config, seed, seed == first, progress)
            row.update({f"info_{k}": v for k, v in method.info.items()})
            per_seed[name][str(seed)] = row
            if curve is not None:
                curves[name] = curve
            fitted.timings[name]["evaluate_s"] += time.perf_counter() - t0
            bar.update(1)
    bar.close()
    return per_seed, curves


def _over_seeds(per_seed: _PerSeed, seeds: tuple[int, ...]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``results["methods"]``: the mean and std over ``seeds`` of every metric of every method."""
    return {
        name: {metric: _aggregate([rows[str(s)][metric] for s in seeds]) for metric in METRICS}
        for name, rows in per_seed.items()
    }


def _figures(runner: _Runner, per_seed: _PerSeed, curves: dict[str, _Curves], out_dir: Path) -> list[Path]:
    """The ROC, PR, sparsification and reliability figures of the first seed (none without curves)."""
    tensors, first = runner.data, runner.config.seeds[0]
    chance = len(tensors.ood_x) / (len(tensors.ood_x) + len(tensors.test_y))
    return _plots(curves, {m: per_seed[m][str(first)] for m in curves}, out_dir, first, chance)


def _results(
    runner: _Runner,
    fitted: _Fitted,
    summary: dict[str, dict[str, dict[str, float | None]]],
    per_seed: _PerSeed,
    lam_info: dict[str, Any] | None,
    files: list[Path],
    command: str | None,
) -> dict[str, Any]:
    """The content of ``results.json``, but for its wall time (:func:`_write` adds it)."""
    config, tensors = runner.config, runner.data
    return {
        "dataset": "fashionmnist",
        "seeds": list(config.seeds),
        "methods": summary,
        "supplementary": supplementary_summary(
            {name: [rows[str(s)] for s in config.seeds] for name, rows in per_seed.items()}
        ),
        "quick": config.quick,
        "ood_dataset": "mnist",
        "data": {"sizes": tensors.sizes, "names": tensors.names, "fingerprint": tensors.fingerprint},
        "lam_posthoc": lam_info,
        "validation_map@1": {str(s): v for s, v in fitted.val_map.items()},
        "per_seed": per_seed,
        "paper": {m: {k: (None if v is None else {"mean": v[0], "std": v[1]}) for k, v in row.items()}
                  for m, row in PAPER_FASHIONMNIST.items()},
        "timings": fitted.timings,
        "trained": list(runner.cache.trained),
        "loaded_from_cache": list(runner.cache.loaded),
        "config": asdict(config),
        "train_recipe": config.recipe,
        "versions": {"lam_plugin": __version__, "torch": torch.__version__, "numpy": np.__version__},
        "machine": _machine(runner.device),
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "files": [p.name for p in files],
    }


def _write(results: dict[str, Any], table: str, out_dir: Path, files: list[Path], start: float) -> None:
    """Write ``results.md`` and ``results.json`` into ``out_dir``, each with the wall time since ``start``."""
    results["wall_time_s"] = time.perf_counter() - start
    (out_dir / "results.md").write_text(_markdown(results, table), encoding="utf-8")
    results["wall_time_s"] = time.perf_counter() - start
    with (out_dir / "results.json").open("w", encoding="utf-8") as stream:
        json.dump(_json_safe(results), stream, indent=2, allow_nan=False)
        stream.write("\n")
    logger.info("wrote %s in %.0f s", ", ".join(p.name for p in files), results["wall_time_s"])
