"""The ``lam-study`` console script.

Subcommands:

``lam-study reproduce fashionmnist [--seeds 1 2 3] [--quick] [--out DIR] [--methods ...]
[--device cpu|cuda] [--no-progress] [--cached-only]``
    Run the paper's FashionMNIST protocol (:mod:`lam_study.reproduce`) and print its table.
``lam-study combine RUN/results.json ... --out DIR [--only FILE=METHOD[,METHOD...]]``
    One table over the union of the seeds of several ``reproduce`` runs (:mod:`lam_study.combine`).
``lam-study info``
    Versions of lam_plugin and its main dependencies, and which datasets are found.

``-v`` (before the subcommand) turns on debug logging. Logging is configured here, never
in the library.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import platform
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from lam_plugin import __version__

logger = logging.getLogger("lam_study.cli")

#: Distributions reported by ``info``: label -> candidate distribution names.
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "backpack": ("backpack-for-pytorch",),
    "laplace": ("laplace-torch",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "pytorch-metric-learning": ("pytorch-metric-learning",),
    "numpy": ("numpy",),
    "scikit-learn": ("scikit-learn",),
    "safetensors": ("safetensors",),
    "matplotlib": ("matplotlib",),
}


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lam-study``."""
    from .reproduce import ALL_METHODS, DEFAULT_METHODS, LAM_APPROXES

    parser = argparse.ArgumentParser(
        prog="lam-study", description="Laplace-approximation uncertainty for PyTorch embedding models."
    )
    parser.add_argument("--version", action="version", version=f"lam-study {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    rep = sub.add_parser(
        "reproduce",
        help="reproduce a table of the paper",
        description="Train (or load from the cache) and evaluate every method of the paper's protocol.",
    )
    rep.add_argument("dataset", choices=["fashionmnist"], help="the experiment to reproduce")
    rep.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 1 2 3 4 5; --quick: 1)")
    rep.add_argument("--quick", action="store_true", help="a reduced smoke run (minutes on a CPU), every method")
    rep.add_argument("--out", default=None, help="output folder (default runs/fashionmnist; trained models are cached in DIR/cache)")
    rep.add_argument(
        "--methods",
        nargs="+",
        choices=ALL_METHODS,
        default=None,
        metavar="METHOD",
        help=f"methods to run (default: {' '.join(DEFAULT_METHODS)}; also: hib)",
    )
    rep.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    rep.add_argument(
        "--cached-only",
        action="store_true",
        help="evaluate the models in DIR/cache only; stop with an error, instead of training, where one is missing",
    )
    rep.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default 20; --quick: 3)")
    rep.add_argument("--samples", type=_positive_int, default=None, help="samples per test image (default 100)")
    rep.add_argument("--train-limit", type=_positive_int, default=None, help="use a random subset of the training split")
    rep.add_argument("--test-limit", type=_positive_int, default=None, help="use a random subset of the test split")
    rep.add_argument("--ood-limit", type=_positive_int, default=None, help="use a random subset of the OoD images")
    rep.add_argument(
        "--val-fraction",
        type=_fraction,
        default=None,
        help="share of the training split held out for validation (default 0.1); 0 fits every model on "
        "the whole split, as the paper's code does, and leaves temperatures at 1",
    )
    rep.add_argument(
        "--prior-precision",
        type=_prior,
        default=None,
        help="post-hoc LAM prior: a number (default 1, the paper's value), marglik, or auto (the candidate "
        "with the best validation ECE)",
    )
    rep.add_argument(
        "--prior-candidates",
        type=_candidate,
        nargs="+",
        default=None,
        metavar="PRIOR",
        help="post-hoc LAM priors evaluated on validation, each with its own calibrated temperature "
        "(default: marglik 1 10 ... 1e6 with --prior-precision auto, else marglik and the fixed prior)",
    )
    rep.add_argument(
        "--online-curvature",
        choices=["pairs", "triplets"],
        default=None,
        help="online LAM's running curvature: the margin-violating triplets rescaled by N/batch "
        "(the paper's code, default) or all pairs rescaled by N^2/pairs (docs/design.md §4)",
    )
    rep.add_argument(
        "--online-loss-miner",
        choices=["all", "triplets"],
        default=None,
        help="pairs of online LAM's contrastive loss: the pairs of the margin-violating triplets (the "
        "paper's code, default) or every pair of the batch",
    )
    rep.add_argument(
        "--online-relu",
        choices=["per_step", "on_use", "per_epoch"],
        default=None,
        help="relu of online LAM's running curvature: on every step's term (docs/design.md §4, "
        "default), only where the signed running sum is used, or on the signed running sum at every "
        "epoch's end (what the latest version of the paper's code does in effect)",
    )
    rep.add_argument(
        "--online-hinge",
        choices=["on", "off"],
        default=None,
        help="count a negative Hessian pair only while its hinge is active (on, docs/design.md §2) or "
        "every mined negative (off, the paper's code)",
    )
    rep.add_argument(
        "--online-max-pairs",
        type=int,
        default=None,
        help="online LAM's Hessian pairs per batch (default: 5000; the paper's code draws 5000 "
        "triplets, i.e. 10000 pairs)",
    )
    rep.add_argument(
        "--online-posterior",
        choices=["running", "refit"],
        default=None,
        help="online LAM's posterior: the running curvature of its training (the paper's method, default) "
        "or the post-hoc LAM fit (--posthoc-approx, --posthoc-pairs) at its final weights",
    )
    rep.add_argument(
        "--online-approx",
        choices=list(LAM_APPROXES),
        default=None,
        help="curvature approximation of online LAM's running curvature: fix (default), pos or full (the paper's "
        "laplace_online_arccos_{pos,full} configurations)",
    )
    rep.add_argument(
        "--posthoc-approx",
        choices=list(LAM_APPROXES),
        default=None,
        help="curvature approximation of the post-hoc fits (post-hoc LAM, --online-posterior refit): "
        "fix (the paper's, default), pos or full",
    )
    rep.add_argument(
        "--posthoc-pairs",
        choices=["all", "triplets"],
        default=None,
        help="Hessian pairs of the post-hoc fits (post-hoc LAM, --online-posterior refit): every pair of each "
        "batch (default) or the pairs of the margin-violating triplets, every mined negative counted (the "
        "paper's post-hoc code)",
    )
    rep.add_argument(
        "--train-recipe",
        choices=["adam", "paper"],
        default=None,
        help="training of the deterministic, ensemble and MC-dropout networks: the paper's code (default: "
        "RMSprop at lr 1e-3 x batch size, weight decay 1e-5, lr decay e^-0.01 per epoch, loss on the pairs of "
        "the margin-violating triplets) or Adam at lr 1e-3 on all pairs; online LAM's RMSprop at 1e-3 x its "
        "batch size (0.064, the paper's code) or 1e-3 (adam)",
    )
    rep.add_argument(
        "--keep-best-epoch",
        action="store_true",
        default=None,
        help="end the training of the deterministic, ensemble and MC-dropout networks with the weights of the "
        "epoch of highest validation mAP@5 (the paper's code keeps its best.ckpt); default: the last epoch",
    )
    rep.add_argument(
        "--online-lr",
        type=float,
        default=None,
        help="online LAM's RMSprop learning rate (overrides the recipe's: 0.064, or 1e-3 with "
        "--train-recipe adam)",
    )
    rep.add_argument(
        "--dropout-layout",
        choices=["channel", "pool"],
        default=None,
        help="MC dropout's layers: channel dropout after the first ReLU and after the pooling (the "
        "paper's network, default) or one element-wise dropout after the pooling",
    )
    rep.add_argument("--data-root", default=None, help="folder with the FashionMNIST IDX files (searched first)")
    rep.set_defaults(handler=_cmd_reproduce)

    comb = sub.add_parser(
        "combine",
        help="combine the results.json of several reproduce runs",
        description="Mean ± std over the union of the seeds of several `reproduce` runs of the same data, "
        "from their per-seed numbers (nothing is re-evaluated). A method and seed found in two runs must "
        "have the same numbers, and the runs a method draws on must share their configuration unless "
        "--allow-config-differences is given.",
    )
    comb.add_argument(
        "results", nargs="+", help="results.json files (at least two; a combined one stands for its sources)"
    )
    comb.add_argument("--out", required=True, help="folder for the combined results.json and results.md")
    comb.add_argument(
        "--allow-config-differences",
        action="store_true",
        help="combine a method's seeds from runs whose configurations differ (they are listed in results.md)",
    )
    comb.add_argument(
        "--only",
        action="append",
        default=[],
        type=_only,
        metavar="FILE=METHOD[,METHOD...]",
        help="take only these methods from FILE, one of the results files (repeatable); e.g. "
        "--only runs/a/results.json=mc_dropout",
    )
    comb.set_defaults(handler=_cmd_combine)

    info = sub.add_parser("info", help="versions and available datasets")
    info.set_defaults(handler=_cmd_info)
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~lam_study.reproduce.ReproduceConfig` that ``reproduce`` arguments describe."""
    from .reproduce import ReproduceConfig, with_overrides

    base = ReproduceConfig.quick_run() if args.quick else ReproduceConfig()
    if args.train_recipe is not None:
        base = base.with_recipe(args.train_recipe)
    return with_overrides(
        base,
        seeds=tuple(args.seeds) if args.seeds else None,
        methods=tuple(args.methods) if args.methods else None,
        epochs=args.epochs,
        n_samples=args.samples,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        ood_limit=args.ood_limit,
        val_fraction=args.val_fraction,
        prior_precision=args.prior_precision,
        prior_candidates=tuple(args.prior_candidates) if args.prior_candidates else None,
        online_curvature=args.online_curvature,
        online_loss_miner=args.online_loss_miner,
        online_relu=args.online_relu,
        dropout_layout=args.dropout_layout,
        online_hinge=None if args.online_hinge is None else args.online_hinge == "on",
        online_max_pairs=args.online_max_pairs,
        online_posterior=args.online_posterior,
        online_approx=args.online_approx,
        posthoc_approx=args.posthoc_approx,
        posthoc_pairs=args.posthoc_pairs,
        online_lr=args.online_lr,
        keep_best_epoch=args.keep_best_epoch,
    )


def _cmd_reproduce(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .reproduce import reproduce

    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"lam-study reproduce: error: {err}", file=sys.stderr)
        return 2
    out = args.out or "runs/fashionmnist"
    result = reproduce(
        args.dataset,
        config,
        out=out,
        data_root=args.data_root,
        device=args.device,
        progress=not args.no_progress,
        command=" ".join(["lam-study", *argv]),
        cached_only=args.cached_only,
    )
    res = result.results
    print(f"\nFashionMNIST -> MNIST, seeds {' '.join(map(str, res['seeds']))}{' (quick)' if res['quick'] else ''}\n")
    print(result.table)
    if res.get("lam_posthoc"):
        lam = res["lam_posthoc"]
        print(f"\npost-hoc LAM prior precision: {lam['prior_precision']} ({lam['selection']})")
    trained = len(result.trained)
    print(f"\n{trained} model(s) trained, {len(result.loaded)} loaded from {result.out_dir / 'cache'}")
    print(f"wall time {res['wall_time_s']:.0f} s; wrote:")
    for path in result.files:
        print(f"  {path}")
    return 0


def _merged_only(pairs: Sequence[tuple[str, list[str]]]) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for path, names in pairs:
        kept = merged.setdefault(path, [])
        for name in names:
            if name not in kept:
                kept.append(name)
    return merged


def _cmd_combine(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .combine import write_combined
    from .reproduce import results_table, seed_counts

    try:
        combined, files = write_combined(
            args.results,
            args.out,
            command=" ".join(["lam-study", *argv]),
            allow_config_differences=args.allow_config_differences,
            only=_merged_only(args.only),
        )
    except (OSError, ValueError) as err:
        print(f"lam-study combine: error: {err}", file=sys.stderr)
        return 2
    for method, seeds in combined["seeds_by_method"].items():
        print(f"{method}: seeds {' '.join(map(str, seeds))}")
    print()
    print(results_table(combined["methods"], paper=None, n_seeds=seed_counts(combined)))
    if combined["config_differences"]:
        print("\nconfiguration differences between the sources of one method: see results.md")
    print("wrote:")
    for path in files:
        print(f"  {path}")
    return 0


def _version(names: Sequence[str]) -> str:
    for name in names:
        try:
            return f"{importlib.metadata.version(name)} ({name})" if len(names) > 1 else importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _cmd_info(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    from .data import DATASETS, DatasetNotFoundError

    print(f"lam_plugin {__version__}")
    print(f"python {platform.python_version()} ({platform.platform()})")
    for label, names in _DISTRIBUTIONS.items():
        print(f"{label:24s} {_version(names)}")
    cuda = torch.cuda.is_available()
    print(f"{'cuda':24s} {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available'}")
    print("datasets:")
    for name, loader in DATASETS.items():
        split = "test"
        try:
            data = loader(split=split)
        except DatasetNotFoundError:
            print(f"  {name:14s} not found")
        except Exception as err:  # a broken file should not stop the report
            print(f"  {name:14s} unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
        else:
            print(f"  {name:14s} found: {len(data):,} {split} images ({data.name}, {tuple(data.images.shape[1:])})")
    return 0


class _TqdmHandler(logging.Handler):
    """Writes records through ``tqdm.write`` so that they do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Log ``lam_plugin.*`` at INFO (DEBUG with ``-v``) to stderr for the duration of a command.

    The handler sits on the ``lam_plugin`` logger (which stops propagating meanwhile), so
    the output has one format whatever the root logger holds (``laplace`` installs a
    default root handler when imported); everything is restored afterwards, which keeps
    an in-process ``main()`` call free of lasting side effects.
    """
    package = logging.getLogger("lam_plugin")
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    saved = (package.level, package.propagate)
    package.addHandler(handler)
    package.setLevel(logging.DEBUG if verbose else logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(saved[0])
        package.propagate = saved[1]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lam-study``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    from .data import DatasetNotFoundError
    from .reproduce import CacheMissError, DeviceUnavailableError

    try:
        with _logging(args.verbose):
            return int(args.handler(args, argv))
    except DatasetNotFoundError as err:
        print(f"lam-study: error: {err}", file=sys.stderr)
        return 1
    except (DeviceUnavailableError, CacheMissError) as err:
        print(f"lam-study: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lam-study: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
