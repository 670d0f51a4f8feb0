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

The package's modules: :mod:`~lam_study.reproduce.constants` (the option tuples and
constants, the paper's numbers), :mod:`~lam_study.reproduce.config` (the errors,
:class:`ReproduceConfig`), :mod:`~lam_study.reproduce.protocol` (the datasets, subsets
and validation split), :mod:`~lam_study.reproduce.runner` (training, fitting and caching
of each method; their cache keys: :mod:`~lam_study.reproduce.specs`),
:mod:`~lam_study.reproduce.evaluation` (metrics, curves, prior choice, mean and std
over seeds), :mod:`~lam_study.reproduce.report` (the tables, figures, machine),
:mod:`~lam_study.reproduce.markdown` (the text of ``results.md``) and
:mod:`~lam_study.reproduce.steps` (the steps of a run); this module holds the entry
points and re-exports the public names.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lam_plugin.numerics import flush_denormals

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
    with_overrides,
)
from .evaluation import supplementary_summary
from .protocol import ProtocolData, _prepare, load_fashionmnist_protocol
from .report import results_table, seed_counts
from .runner import _Runner
from .steps import (
    _choose_posthoc_prior,
    _evaluate_all,
    _figures,
    _fit_all,
    _over_seeds,
    _results,
    _usable_device,
    _write,
)

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
    device = _usable_device(device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_fashionmnist_protocol(data_root)
    tensors = _prepare(data, config)
    logger.info("data: %s", tensors.sizes)
    runner = _Runner(config, tensors, out_dir / "cache", device, progress, cached_only)
    methods = [m for m in ALL_METHODS if m in config.methods]
    # 1. train or load every method; post-hoc prior candidates on the validation split
    fitted = _fit_all(runner, methods)
    lam_info = _choose_posthoc_prior(runner, fitted) if "lam_posthoc" in methods else None
    # 2. evaluate on the test split and the OoD set
    per_seed, curves = _evaluate_all(runner, fitted, methods)
    # 3. the table, the figures, results.md and results.json
    summary = _over_seeds(per_seed, config.seeds)
    table = results_table(summary, n_seeds={m: len(config.seeds) for m in methods})
    files = [out_dir / "results.json", out_dir / "results.md", *_figures(runner, per_seed, curves, out_dir)]
    results = _results(runner, fitted, summary, per_seed, lam_info, files, command)
    _write(results, table, out_dir, files, start)
    return ReproduceResult(results, table, out_dir, files, list(runner.cache.trained), list(runner.cache.loaded))


def reproduce(dataset: str, config: ReproduceConfig | None = None, **kwargs: Any) -> ReproduceResult:
    """Run the protocol for ``dataset`` (only ``"fashionmnist"`` here); ``kwargs`` go to it."""
    key = dataset.lower().replace("-", "").replace("_", "")
    if key != "fashionmnist":
        raise ValueError(f"no reproduction protocol for {dataset!r}; available: fashionmnist")
    return reproduce_fashionmnist(config, **kwargs)
