"""The settings of the protocol: :class:`ReproduceConfig` and the errors a run raises.

The option tuples and constants it is checked against, and the paper's FashionMNIST
numbers, live in :mod:`~lam_study.reproduce.constants`; they are importable from here
too."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..models import DROPOUT_LAYOUTS
from ..paper import CURVATURES, RELUS
from .constants import (
    ALL_METHODS,
    CACHE_VERSION,
    CALIBRATION_TEMPERATURES,
    CONFIG_FIELDS_ABSENT,
    DEFAULT_METHODS,
    DEFAULT_PRIOR_CANDIDATES,
    LAM_APPROXES,
    LOSS_MINERS,
    METHOD_LABELS,
    METRIC_LABELS,
    METRICS,
    ONLINE_LATER_DEFAULTS,
    ONLINE_POSTERIORS,
    OPTIMIZERS,
    PAPER_FASHIONMNIST,
    POSTHOC_PAIRS,
    SUPPLEMENTARY_METRICS,
    TRAIN_RECIPES,
    UNCERTAINTY_METRICS,
)

__all__ = [
    "ALL_METHODS",
    "CACHE_VERSION",
    "CALIBRATION_TEMPERATURES",
    "CONFIG_FIELDS_ABSENT",
    "DEFAULT_METHODS",
    "DEFAULT_PRIOR_CANDIDATES",
    "LAM_APPROXES",
    "LOSS_MINERS",
    "METHOD_LABELS",
    "METRICS",
    "METRIC_LABELS",
    "ONLINE_LATER_DEFAULTS",
    "ONLINE_POSTERIORS",
    "OPTIMIZERS",
    "PAPER_FASHIONMNIST",
    "POSTHOC_PAIRS",
    "SUPPLEMENTARY_METRICS",
    "TRAIN_RECIPES",
    "UNCERTAINTY_METRICS",
    "CacheMissError",
    "DeviceUnavailableError",
    "ReproduceConfig",
    "with_overrides",
]


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
            paper's code, the default here) or ``"pairs"`` (docs/design.md §4, the
            default of ``fit_online``); see :mod:`lam_plugin.online`. On seed 1,
            "triplets" gave AUROC 0.95 against 0.92 (docs/results/findings.md, item 4).
        online_loss_miner: the pairs of online LAM's contrastive loss: ``"triplets"``
            (the pairs of the margin-violating triplets, pytorch-metric-learning's
            ``TripletMarginMiner(type_of_triplets="all")``, as the paper's code; the
            default) or ``"all"`` (every pair of the batch).
        online_relu: where the ``relu`` of online LAM's running curvature is applied:
            ``"per_step"`` (docs/design.md §4), ``"on_use"`` or ``"per_epoch"`` (the paper's latest
            code in effect); see :mod:`lam_study.paper`.
        online_hinge: count a negative Hessian pair only while its hinge is active
            (docs/design.md §2); ``False`` counts every mined negative (the paper's code).
        online_max_pairs: online LAM's Hessian pairs per batch (default ``max_pairs``);
            the paper's code draws 5,000 triplets, that is 10,000 pairs.
        online_approx: the curvature approximation of online LAM's running curvature:
            ``"fix"`` (docs/design.md §7, the default), ``"pos"`` or ``"full"`` (the paper's
            ``configs/fashionmnist/laplace_online_arccos_{pos,full}.yaml``).
        posthoc_approx: the curvature approximation of the post-hoc fits (post-hoc LAM and
            ``online_posterior="refit"``): ``"fix"`` (the paper's, the default), ``"pos"``
            (positive pairs only, with the cross terms) or ``"full"`` (every pair with the
            cross terms); docs/design.md §2.
        posthoc_pairs: the Hessian pairs of the post-hoc fits: ``"all"`` (every pair of
            each batch, at most ``max_pairs``; docs/design.md §7, the default) or
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
            which then become its most certain ones (docs/results/findings.md, item 8).
        max_pairs: at most this many pairs per batch enter the curvature.
        n_samples: samples per test input (weight samples, dropout passes, PFE/HIB draws).
        dropout: MC-dropout rate.
        dropout_layout: where the MC-dropout network drops (:data:`~lam_study.models.DROPOUT_LAYOUTS`):
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
        """Normalise the sequences to tuples, then check every field (the first problem raises)."""
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.prior_candidates is not None:
            object.__setattr__(self, "prior_candidates", tuple(self.prior_candidates))
        self._check_runs_and_sizes()
        self._check_lam_choices()
        self._check_training()
        self._check_validation_and_data()

    def _check_runs_and_sizes(self) -> None:
        """Seeds and methods (non-empty, distinct, known) and the positive sizes."""
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

    def _check_lam_choices(self) -> None:
        """The LAM options and the loss miners, each one of its choices."""
        if self.online_curvature not in CURVATURES:
            raise ValueError(
                f"online_curvature must be one of {CURVATURES}, got {self.online_curvature!r}"
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

    def _check_training(self) -> None:
        """Optimiser, learning rates and decay, online LAM's relu and pairs, samples, ensemble and dropout."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0 or not self.head_lr > 0 or not self.online_lr > 0 or self.weight_decay < 0:
            raise ValueError(
                "lr, head_lr and online_lr must be positive and weight_decay non-negative, got "
                f"{self.lr}, {self.head_lr}, {self.online_lr}, {self.weight_decay}"
            )
        if self.lr_decay is not None and not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must lie in (0, 1] (or None), got {self.lr_decay}")
        if self.online_relu not in RELUS:
            raise ValueError(f"online_relu must be one of {RELUS}, got {self.online_relu!r}")
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

    def _check_validation_and_data(self) -> None:
        """The validation split and what needs it, the prior precisions, the data subsets."""
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

def with_overrides(config: ReproduceConfig, **overrides: Any) -> ReproduceConfig:
    """``config`` with the non-None ``overrides`` applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
