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

from .cli_args import add_combine_arguments, add_reproduce_arguments

logger = logging.getLogger("lam_study.cli")

#: Distributions reported by ``info``: label -> candidate distribution names.
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "backpack": ("backpack-for-pytorch",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "pytorch-metric-learning": ("pytorch-metric-learning",),
    "numpy": ("numpy",),
    "scikit-learn": ("scikit-learn",),
    "safetensors": ("safetensors",),
    "matplotlib": ("matplotlib",),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lam-study`` (the subcommands' arguments: :mod:`lam_study.cli_args`)."""
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
    add_reproduce_arguments(rep)
    rep.set_defaults(handler=_cmd_reproduce)

    comb = sub.add_parser(
        "combine",
        help="combine the results.json of several reproduce runs",
        description="Mean ± std over the union of the seeds of several `reproduce` runs of the same data, "
        "from their per-seed numbers (nothing is re-evaluated). A method and seed found in two runs must "
        "have the same numbers, and the runs a method draws on must share their configuration unless "
        "--allow-config-differences is given.",
    )
    add_combine_arguments(comb)
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
    the output has one format whatever the root logger holds (an imported library may
    have installed a default root handler); everything is restored afterwards, which keeps
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
