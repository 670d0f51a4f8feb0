"""The arguments of ``lam-study``'s subcommands, one function per group, and their types.

:func:`add_reproduce_arguments` and :func:`add_combine_arguments` fill the subparsers
that :func:`lam_study.cli.build_parser` creates; the groups keep the order in which the
options appear in ``--help``.
"""

from __future__ import annotations

import argparse


def _prior(value: str) -> float | str:
    if value in ("auto", "marglik"):
        return value
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'marglik' or a positive number, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"the prior precision must be positive, got {value}")
    return number


def _candidate(value: str) -> float | str:
    """A post-hoc prior candidate: 'marglik' or a positive number ('auto' is not a candidate)."""
    if value == "auto":
        raise argparse.ArgumentTypeError("'auto' chooses among the candidates; it cannot be one")
    return _prior(value)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}") from None
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return number


def _only(value: str) -> tuple[str, list[str]]:
    path, sep, methods = value.rpartition("=")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not sep or not path or not names:
        raise argparse.ArgumentTypeError(f"expected FILE=METHOD[,METHOD...], got {value!r}")
    return path, names


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``lam-study reproduce``, group by group."""
    _add_run_arguments(parser)
    _add_size_arguments(parser)
    _add_prior_arguments(parser)
    _add_online_arguments(parser)
    _add_posthoc_arguments(parser)
    _add_training_arguments(parser)
    parser.add_argument("--data-root", default=None, help="folder with the FashionMNIST IDX files (searched first)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What to run, where, and how: the experiment, seeds, methods, output folder and device."""
    from .reproduce import ALL_METHODS, DEFAULT_METHODS

    parser.add_argument("dataset", choices=["fashionmnist"], help="the experiment to reproduce")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="training seeds (default 1 2 3 4 5; --quick: 1)"
    )
    parser.add_argument("--quick", action="store_true", help="a reduced smoke run (minutes on a CPU), every method")
    parser.add_argument(
        "--out", default=None, help="output folder (default runs/fashionmnist; trained models are cached in DIR/cache)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=ALL_METHODS,
        default=None,
        metavar="METHOD",
        help=f"methods to run (default: {' '.join(DEFAULT_METHODS)}; also: hib)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="evaluate the models in DIR/cache only; stop with an error, instead of training, where one is missing",
    )


def _add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """How much training, sampling and data: epochs, samples, subsets and the validation share."""
    parser.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default 20; --quick: 3)")
    parser.add_argument("--samples", type=_positive_int, default=None, help="samples per test image (default 100)")
    parser.add_argument(
        "--train-limit", type=_positive_int, default=None, help="use a random subset of the training split"
    )
    parser.add_argument("--test-limit", type=_positive_int, default=None, help="use a random subset of the test split")
    parser.add_argument("--ood-limit", type=_positive_int, default=None, help="use a random subset of the OoD images")
    parser.add_argument(
        "--val-fraction",
        type=_fraction,
        default=None,
        help="share of the training split held out for validation (default 0.1); 0 fits every model on "
        "the whole split, as the paper's code does, and leaves temperatures at 1",
    )


def _add_prior_arguments(parser: argparse.ArgumentParser) -> None:
    """The prior precision of post-hoc LAM and the candidates compared on validation."""
    parser.add_argument(
        "--prior-precision",
        type=_prior,
        default=None,
        help="post-hoc LAM prior: a number (default 1, the paper's value), marglik, or auto (the candidate "
        "with the best validation ECE)",
    )
    parser.add_argument(
        "--prior-candidates",
        type=_candidate,
        nargs="+",
        default=None,
        metavar="PRIOR",
        help="post-hoc LAM priors evaluated on validation, each with its own calibrated temperature "
        "(default: marglik 1 10 ... 1e6 with --prior-precision auto, else marglik and the fixed prior)",
    )


def _add_online_arguments(parser: argparse.ArgumentParser) -> None:
    """Online LAM's loss, running curvature and posterior."""
    from .reproduce import LAM_APPROXES

    parser.add_argument(
        "--online-curvature",
        choices=["pairs", "triplets"],
        default=None,
        help="online LAM's running curvature: the margin-violating triplets rescaled by N/batch "
        "(the paper's code, default) or all pairs rescaled by N^2/pairs (docs/design.md §4)",
    )
    parser.add_argument(
        "--online-loss-miner",
        choices=["all", "triplets"],
        default=None,
        help="pairs of online LAM's contrastive loss: the pairs of the margin-violating triplets (the "
        "paper's code, default) or every pair of the batch",
    )
    parser.add_argument(
        "--online-relu",
        choices=["per_step", "on_use", "per_epoch"],
        default=None,
        help="relu of online LAM's running curvature: on every step's term (docs/design.md §4, "
        "default), only where the signed running sum is used, or on the signed running sum at every "
        "epoch's end (what the latest version of the paper's code does in effect)",
    )
    parser.add_argument(
        "--online-hinge",
        choices=["on", "off"],
        default=None,
        help="count a negative Hessian pair only while its hinge is active (on, docs/design.md §2) or "
        "every mined negative (off, the paper's code)",
    )
    parser.add_argument(
        "--online-max-pairs",
        type=int,
        default=None,
        help="online LAM's Hessian pairs per batch (default: 5000; the paper's code draws 5000 "
        "triplets, i.e. 10000 pairs)",
    )
    parser.add_argument(
        "--online-posterior",
        choices=["running", "refit"],
        default=None,
        help="online LAM's posterior: the running curvature of its training (the paper's method, default) "
        "or the post-hoc LAM fit (--posthoc-approx, --posthoc-pairs) at its final weights",
    )
    parser.add_argument(
        "--online-approx",
        choices=list(LAM_APPROXES),
        default=None,
        help="curvature approximation of online LAM's running curvature: fix (default), pos or full (the paper's "
        "laplace_online_arccos_{pos,full} configurations)",
    )


def _add_posthoc_arguments(parser: argparse.ArgumentParser) -> None:
    """The curvature approximation and Hessian pairs of the post-hoc fits."""
    from .reproduce import LAM_APPROXES

    parser.add_argument(
        "--posthoc-approx",
        choices=list(LAM_APPROXES),
        default=None,
        help="curvature approximation of the post-hoc fits (post-hoc LAM, --online-posterior refit): "
        "fix (the paper's, default), pos or full",
    )
    parser.add_argument(
        "--posthoc-pairs",
        choices=["all", "triplets"],
        default=None,
        help="Hessian pairs of the post-hoc fits (post-hoc LAM, --online-posterior refit): every pair of each "
        "batch (default) or the pairs of the margin-violating triplets, every mined negative counted (the "
        "paper's post-hoc code)",
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training of the networks: recipe, epoch kept, online LAM's learning rate, dropout layout."""
    parser.add_argument(
        "--train-recipe",
        choices=["adam", "paper"],
        default=None,
        help="training of the deterministic, ensemble and MC-dropout networks: the paper's code (default: "
        "RMSprop at lr 1e-3 x batch size, weight decay 1e-5, lr decay e^-0.01 per epoch, loss on the pairs of "
        "the margin-violating triplets) or Adam at lr 1e-3 on all pairs; online LAM's RMSprop at 1e-3 x its "
        "batch size (0.064, the paper's code) or 1e-3 (adam)",
    )
    parser.add_argument(
        "--keep-best-epoch",
        action="store_true",
        default=None,
        help="end the training of the deterministic, ensemble and MC-dropout networks with the weights of the "
        "epoch of highest validation mAP@5 (the paper's code keeps its best.ckpt); default: the last epoch",
    )
    parser.add_argument(
        "--online-lr",
        type=float,
        default=None,
        help="online LAM's RMSprop learning rate (overrides the recipe's: 0.064, or 1e-3 with "
        "--train-recipe adam)",
    )
    parser.add_argument(
        "--dropout-layout",
        choices=["channel", "pool"],
        default=None,
        help="MC dropout's layers: channel dropout after the first ReLU and after the pooling (the "
        "paper's network, default) or one element-wise dropout after the pooling",
    )


def add_combine_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``lam-study combine``."""
    parser.add_argument(
        "results", nargs="+", help="results.json files (at least two; a combined one stands for its sources)"
    )
    parser.add_argument("--out", required=True, help="folder for the combined results.json and results.md")
    parser.add_argument(
        "--allow-config-differences",
        action="store_true",
        help="combine a method's seeds from runs whose configurations differ (they are listed in results.md)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        type=_only,
        metavar="FILE=METHOD[,METHOD...]",
        help="take only these methods from FILE, one of the results files (repeatable); e.g. "
        "--only runs/a/results.json=mc_dropout",
    )
