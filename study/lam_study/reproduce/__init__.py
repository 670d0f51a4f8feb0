"""The paper's FashionMNIST experiment (docs/design.md §7), end to end.

``reproduce_fashionmnist(config, out)`` trains (or loads from its cache) every method for
every seed, evaluates it on the FashionMNIST test split (in-distribution) and on MNIST
(out-of-distribution), and writes into ``out``:

``results.json``
    ``{"dataset": "fashionmnist", "seeds": [...], "methods": {name: {metric: {"mean", "std"}}}}``
    with the metrics ``map@1 map@5 map@10 auroc auprc ausc ece`` (``null`` where a method
    has no uncertainty), plus details: per-seed values, validation numbers, the chosen
    prior precision, timings, machine, command, configuration.
``results.md``
    the table in the paper's layout next to the paper's FashionMNIST numbers, and notes
    on every choice this protocol makes.
``roc.png``, ``pr.png``, ``sparsification.png``, ``reliability.png``
    one figure per kind with every method that has an uncertainty (first seed).
``cache/``
    trained models as ``<method>-seed<k>-<config hash>.safetensors`` (state dicts, never
    pickles), so a rerun evaluates without retraining.

Protocol (what the code does; ``results.md`` repeats it):

* FashionMNIST train is split once (generator seeded with ``split_seed``) into a fit part
  and a validation part (``val_fraction``, 10 %); every model is trained on the fit part,
  every choice (the post-hoc prior precision) is made on the validation part, and the
  test split and MNIST are used only for the reported numbers.
* Network: :func:`lam_study.models.fashionmnist_net` without its L2 normalisation
  (the losses and the posterior normalise), embedding dimension 3, margin 0.7, seeds
  ``1..5``; the initial weights of seed ``s`` are the same for the deterministic,
  MC-dropout and online-LAM networks. Training follows the paper's code by default
  (:meth:`ReproduceConfig.with_recipe`: RMSprop at lr 1e-3 × batch size, the loss on the
  pairs of each batch's margin-violating triplets); the ``"adam"`` recipe is the option.
* Methods: ``deterministic``; ``deep_ensemble`` (members = the deterministic networks of
  seeds ``s .. s+M-1``); ``pfe`` (variance head on the frozen deterministic network);
  ``hib`` (optional); ``mc_dropout`` (the paper's channel dropout 0.05 after the first
  ReLU and after the pooling, 100 passes);
  ``lam_posthoc`` (last-layer, ``arccos`` + ``fix``, at most 5000 pairs per batch of 64,
  on the deterministic network of the same seed); ``lam_online``
  (:meth:`LaplaceEmbedder.fit_online` from the same initial weights).

The package's modules: :mod:`~lam_study.reproduce.config` (the option tuples and
constants, the paper's numbers, the errors, :class:`ReproduceConfig`),
:mod:`~lam_study.reproduce.protocol` (the datasets, subsets and validation split),
:mod:`~lam_study.reproduce.runner` (training, fitting and caching of each method),
:mod:`~lam_study.reproduce.evaluation` (metrics, curves, prior choice, mean and std
over seeds) and :mod:`~lam_study.reproduce.report` (the table, ``results.md``, figures,
machine); this module holds the entry points and re-exports the public names.
"""

from __future__ import annotations

import json
import logging
import os
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
from lam_plugin.numerics import flush_denormals
from lam_plugin.posterior import EmbeddingPosterior

from ..training import seeded
from .config import (
    ALL_METHODS,
    CONFIG_FIELDS_ABSENT,
    DEFAULT_METHODS,
    DEFAULT_PRIOR_CANDIDATES,
    LAM_APPROXES,
    METHOD_LABELS,
    METRICS,
    PAPER_FASHIONMNIST,
    SUPPLEMENTARY_METRICS,
    UNCERTAINTY_METRICS,
    CacheMissError,
    DeviceUnavailableError,
    ReproduceConfig,
    _prior_name,
    with_overrides,
)
from .evaluation import (
    _aggregate,
    _choose_prior,
    _Curves,
    _evaluate,
    _predict_all,
    _validate_posterior,
    supplementary_summary,
)
from .protocol import ProtocolData, _prepare, load_fashionmnist_protocol
from .report import _json_safe, _machine, _markdown, _plots, results_table, seed_counts
from .runner import _Method, _posterior_predict, _Runner

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_METHODS",
    "CONFIG_FIELDS_ABSENT",
    "DEFAULT_METHODS",
    "DEFAULT_PRIOR_CANDIDATES",
    "LAM_APPROXES",
    "METHOD_LABELS",
    "METRICS",
    "PAPER_FASHIONMNIST",
    "SUPPLEMENTARY_METRICS",
    "UNCERTAINTY_METRICS",
    "CacheMissError",
    "DeviceUnavailableError",
    "ProtocolData",
    "ReproduceConfig",
    "ReproduceResult",
    "load_fashionmnist_protocol",
    "reproduce",
    "reproduce_fashionmnist",
    "results_table",
    "seed_counts",
    "supplementary_summary",
    "with_overrides",
]


@dataclass
class ReproduceResult:
    """What a run produced.

    Attributes:
        results: the content of ``results.json``.
        table: the markdown table (this run next to the paper).
        out_dir: the output folder.
        files: every file written (outside the cache).
        trained: cache files written by this run (models trained or posteriors fitted);
            empty when everything came from the cache.
        loaded: cache files this run read instead of training.
    """

    results: dict[str, Any]
    table: str
    out_dir: Path
    files: list[Path]
    trained: list[str]
    loaded: list[str]


@flush_denormals()
def reproduce_fashionmnist(
    config: ReproduceConfig | None = None,
    out: str | os.PathLike[str] = "runs/fashionmnist",
    *,
    data: ProtocolData | None = None,
    data_root: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    command: str | None = None,
    cached_only: bool = False,
) -> ReproduceResult:
    """Run the paper's FashionMNIST protocol and write its results into ``out``.

    Args:
        config: the settings (default: the paper's full run, :class:`ReproduceConfig`).
        out: output folder (created); trained models are cached in ``out/cache``.
        data: the datasets to use instead of loading FashionMNIST and MNIST (tests,
            other sources); subsets and the validation split are applied as usual.
        data_root: where to look for FashionMNIST first (see :func:`lam_study.data.load_fashionmnist`).
        device: ``"cpu"`` or ``"cuda"``.
        progress: show tqdm progress bars.
        command: the command line to record (default: ``sys.argv``).
        cached_only: evaluate models from ``out/cache`` only: a model or fit of this
            configuration that is not cached raises :class:`CacheMissError` instead of
            being trained (for re-evaluating finished runs, e.g. after a metric changed).

    Raises:
        DatasetNotFoundError: a dataset is missing.
        DeviceUnavailableError: ``device`` is CUDA and no CUDA device is usable.
        CacheMissError: ``cached_only`` and a model of this configuration is not cached.
    """
    start = time.perf_counter()
    config = config or ReproduceConfig()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "device 'cuda' was asked for, but this torch build or machine has no usable CUDA device "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use device 'cpu'"
        )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_fashionmnist_protocol(data_root)
    tensors = _prepare(data, config)
    logger.info("data: %s", tensors.sizes)
    runner = _Runner(config, tensors, out_dir / "cache", device, progress, cached_only)
    methods = [m for m in ALL_METHODS if m in config.methods]

    # 1. train or load every method; post-hoc prior candidates on the validation split
    built: dict[str, dict[int, _Method]] = {m: {} for m in methods}
    posthoc: dict[int, dict[str, EmbeddingPosterior]] = {}
    validation: dict[int, dict[str, dict[str, float]]] = {}
    val_map: dict[int, float] = {}
    timings: dict[str, dict[str, float]] = {m: {"train_s": 0.0, "evaluate_s": 0.0} for m in methods}
    bar = tqdm(total=len(methods) * len(config.seeds), desc="train", disable=not progress)
    for seed in config.seeds:
        for name in methods:
            bar.set_postfix(method=name, seed=seed)
            t0 = time.perf_counter()
            if name == "lam_posthoc":
                posthoc[seed] = runner.lam_posthoc_candidates(seed)
                if len(tensors.val_y) >= 2:
                    with seeded(30_000 + seed):
                        validation[seed] = {
                            c: _validate_posterior(p, tensors, config, seed, progress) for c, p in posthoc[seed].items()
                        }
            else:
                built[name][seed] = runner.build(name, seed)
                if name == "deterministic" and len(tensors.val_y) >= 2:
                    det = built[name][seed]
                    val_map[seed] = M.map_at_k(_predict_all(det, tensors.val_x, False, config.eval_batch_size,
                                                            "deterministic: validation", progress).mean,
                                               tensors.val_y, 1)
            timings[name]["train_s"] += time.perf_counter() - t0
            bar.update(1)
    bar.close()

    lam_info: dict[str, Any] | None = None
    if "lam_posthoc" in methods:
        if config.prior_precision == "auto":
            if not validation:
                raise ValueError("prior_precision='auto' needs a validation split of at least 2 images")
            chosen, selection = _choose_prior(validation), "validation"
        else:
            chosen, selection = _prior_name(config.prior_precision), "fixed"
        for seed in config.seeds:
            values = runner.prior_values[seed]
            built["lam_posthoc"][seed] = _Method(
                "lam_posthoc",
                _posterior_predict(posthoc[seed][chosen], config.n_samples, seed),
                info={"prior_precision": values[chosen]},
            )
        lam_info = {
            "prior_precision": chosen,
            "selection": selection,
            "candidates": [_prior_name(c) for c in config.candidates],
            "prior_values": {str(s): v for s, v in runner.prior_values.items()},
            "temperatures": {str(s): v for s, v in runner.temperatures.items()},
            "validation": {str(s): v for s, v in validation.items()},
            "curvature": {str(s): v for s, v in runner.curvature_stats.items()},
        }
        logger.info("post-hoc LAM prior precision: %s (%s)", chosen, selection)

    # 2. evaluate on the test split and the OoD set
    per_seed: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in methods}
    curves: dict[str, _Curves] = {}
    first = config.seeds[0]
    bar = tqdm(total=len(methods) * len(config.seeds), desc="evaluate", disable=not progress)
    for seed in config.seeds:
        for name in methods:
            bar.set_postfix(method=name, seed=seed)
            t0 = time.perf_counter()
            method = built[name][seed]
            row, curve = _evaluate(method, tensors, config, seed, seed == first, progress)
            row.update({f"info_{k}": v for k, v in method.info.items()})
            per_seed[name][str(seed)] = row
            if curve is not None:
                curves[name] = curve
            timings[name]["evaluate_s"] += time.perf_counter() - t0
            bar.update(1)
    bar.close()

    summary = {
        name: {metric: _aggregate([per_seed[name][str(s)][metric] for s in config.seeds]) for metric in METRICS}
        for name in methods
    }
    supplementary = supplementary_summary({name: [per_seed[name][str(s)] for s in config.seeds] for name in methods})
    table = results_table(summary, n_seeds={m: len(config.seeds) for m in methods})
    chance = len(tensors.ood_x) / (len(tensors.ood_x) + len(tensors.test_y))
    plot_files = _plots(curves, {m: per_seed[m][str(first)] for m in curves}, out_dir, first, chance)
    files = [out_dir / "results.json", out_dir / "results.md", *plot_files]
    results: dict[str, Any] = {
        "dataset": "fashionmnist",
        "seeds": list(config.seeds),
        "methods": summary,
        "supplementary": supplementary,
        "quick": config.quick,
        "ood_dataset": "mnist",
        "data": {"sizes": tensors.sizes, "names": tensors.names, "fingerprint": tensors.fingerprint},
        "lam_posthoc": lam_info,
        "validation_map@1": {str(s): v for s, v in val_map.items()},
        "per_seed": per_seed,
        "paper": {m: {k: (None if v is None else {"mean": v[0], "std": v[1]}) for k, v in row.items()}
                  for m, row in PAPER_FASHIONMNIST.items()},
        "timings": timings,
        "trained": list(runner.cache.trained),
        "loaded_from_cache": list(runner.cache.loaded),
        "config": asdict(config),
        "train_recipe": config.recipe,
        "versions": {"lam_plugin": __version__, "torch": torch.__version__, "numpy": np.__version__},
        "machine": _machine(device),
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "files": [p.name for p in files],
    }
    results["wall_time_s"] = time.perf_counter() - start
    (out_dir / "results.md").write_text(_markdown(results, table), encoding="utf-8")
    results["wall_time_s"] = time.perf_counter() - start
    with (out_dir / "results.json").open("w", encoding="utf-8") as stream:
        json.dump(_json_safe(results), stream, indent=2, allow_nan=False)
        stream.write("\n")
    logger.info("wrote %s in %.0f s", ", ".join(p.name for p in files), results["wall_time_s"])
    return ReproduceResult(results, table, out_dir, files, list(runner.cache.trained), list(runner.cache.loaded))

def reproduce(dataset: str, config: ReproduceConfig | None = None, **kwargs: Any) -> ReproduceResult:
    """Run the protocol for ``dataset`` (only ``"fashionmnist"`` here); ``kwargs`` go to it."""
    key = dataset.lower().replace("-", "").replace("_", "")
    if key != "fashionmnist":
        raise ValueError(f"no reproduction protocol for {dataset!r}; available: fashionmnist")
    return reproduce_fashionmnist(config, **kwargs)
