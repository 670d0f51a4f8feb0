"""The constants of the protocol: its option tuples, methods and metrics with their labels,
the paper's FashionMNIST numbers, the post-hoc prior candidates, the cache version and the
calibration temperatures (all importable from :mod:`~lam_study.reproduce.config` too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The pairs of a contrastive loss: every pair of a batch, or the pairs of the
#: margin-violating triplets (the paper's code).
LOSS_MINERS: tuple[str, ...] = ("all", "triplets")
#: Optimisers of the contrastive networks (:func:`lam_study.training.train_contrastive`).
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
#: of each batch (docs/design.md §7), or the pairs of the margin-violating triplets (the
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
#: Every method this package knows, in the paper's row order (``hib`` is opt-in).
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

#: Bumped whenever a change in this package makes cached models stale.
CACHE_VERSION = 1


#: covariance multipliers tried when calibrating a posterior on validation ECE
CALIBRATION_TEMPERATURES: tuple[float, ...] = tuple(10.0**e for e in range(-5, 4))
