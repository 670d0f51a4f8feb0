"""Which Hessian pairs put a LAM posterior's uncertainty where the retrieval errors are?

A diagnostic, not a benchmark. For the networks that ``lam-study reproduce
fashionmnist`` cached (``--method lam_online`` or ``deterministic``, ``--key``: the hash
in their file names), it fits the last-layer curvature again at each network's final
weights, with the Hessian pairs and approximation of every ``--variants`` entry:

* ``all-fix``, ``all-pos``: every pair of each batch (the post-hoc fit of ``reproduce``);
* ``triplets-fix``, ``triplets-pos``: the pairs of the margin-violating triplets
  (pytorch-metric-learning's ``TripletMarginMiner(0.7, "all")``), the Hessian pairs of
  online LAM's running curvature (``--online-curvature triplets``);
* ``cached``: the posterior the cache holds (online LAM: its running curvature).

A negative pair counts only while its hinge is active (docs/design.md §2); ``--hinge off`` counts
every mined negative, as the paper's code does.

Every posterior has prior ``--prior`` (default 1, the paper's; for ``cached`` it replaces
the cached prior) and temperature 1 (the AUSC and AUROC barely move with the temperature), the split of ``reproduce`` (54,000 fit / 6,000 validation images), and
``--samples`` weight samples. Per seed and variant it prints the validation and test
AUSC, the AUROC and AUPRC against the 10,000 MNIST digits, the between-class share of
the AUSC's uncertainty (``uncertainty_by_class.py``) and the most uncertain classes;
then the mean over the seeds.

    python benchmarks/hessian_pairs.py --method lam_online --key 05dbf0cb6b [--seeds 1 2 3 4 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.miners import TripletMarginMiner
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin import metrics
from lam_plugin.posterior import EmbeddingPosterior
from lam_plugin.prediction import Prediction
from lam_study.data.fashionmnist import CLASSES
from lam_study.paper import PaperLaplaceEmbedder
from lam_study.reproduce import ReproduceConfig, load_fashionmnist_protocol
from lam_study.reproduce.protocol import _prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_scores import _net
from uncertainty_by_class import class_levels

VARIANTS = ("cached", "all-fix", "all-pos", "triplets-fix", "triplets-pos")
METRICS = ("val_ausc", "ausc", "auroc", "auprc", "between")


def _fit(
    net: torch.nn.Module,
    variant: str,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    config: ReproduceConfig,
    hinge: bool = True,
) -> EmbeddingPosterior:
    """The last-layer posterior (prior 1) of ``net`` fitted on ``x, y`` with the Hessian pairs and
    approximation that ``variant`` (``"<all|triplets>-<fix|pos>"``) names; ``hinge=False``
    counts every negative pair, whatever its hinge."""
    pairs, approx = variant.split("-")
    miner = "all" if pairs == "all" else TripletMarginMiner(margin=config.margin, type_of_triplets="all")
    # the loader of reproduce's post-hoc fit: batches of lam_batch_size, shuffled by the seed
    loader = DataLoader(
        TensorDataset(x, y), batch_size=config.lam_batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    lam = PaperLaplaceEmbedder(
        net, approx=approx, margin=config.margin, miner=miner, max_pairs=config.max_pairs, hinge=hinge,
        progress=False, seed=seed,
    )
    return lam.fit(loader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/fashionmnist/cache"))
    parser.add_argument("--method", choices=["lam_online", "deterministic"], default="lam_online")
    parser.add_argument("--key", required=True, help="the hash of the cached networks, e.g. 05dbf0cb6b")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--prior", type=float, default=1.0, help="prior precision of every posterior")
    parser.add_argument("--hinge", choices=["on", "off"], default="on",
                        help="count a negative pair only while its hinge is active (on) or always (off)")
    args = parser.parse_args(argv)
    config = ReproduceConfig()
    data = _prepare(load_fashionmnist_protocol(), config)
    found: dict[str, list[list[float]]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        net_path = args.cache / f"{args.method}-seed{seed}-{args.key}.safetensors"
        if not net_path.is_file():
            raise SystemExit(f"not found: {net_path}")
        net = _net(net_path)
        for variant in args.variants:
            start = time.perf_counter()
            if variant == "cached":
                post_path = net_path.with_suffix(".posterior.safetensors")
                if not post_path.is_file():
                    print(f"seed {seed} cached: no posterior {post_path.name}")
                    continue
                posterior = EmbeddingPosterior.load(post_path, net)
            else:
                posterior = _fit(net, variant, data.fit_x, data.fit_y, seed, config, args.hinge == "on")
            posterior = EmbeddingPosterior(
                net, posterior.param_names, posterior.curvature, args.prior, mean=posterior.mean, config=posterior.config
            )
            fitted = time.perf_counter() - start

            def predict(x: torch.Tensor, n: int, posterior=posterior, seed=seed) -> Prediction:
                return posterior.predict(x, n=n, generator=torch.Generator().manual_seed(seed), batch_size=2000)

            val, test, ood = predict(data.val_x, 30), predict(data.test_x, args.samples), predict(data.ood_x, args.samples)
            labels = data.test_y.numpy()
            _, _, classes, level, between = class_levels(test.mean.numpy(), test.std.numpy(), labels)
            row = [
                metrics.ausc(val.mean, val.std, data.val_y),
                metrics.ausc(test.mean, test.std, labels),
                metrics.auroc(test.uncertainty, ood.uncertainty),
                metrics.auprc(test.uncertainty, ood.uncertainty),
                between,
            ]
            found[variant].append(row)
            top = ", ".join(f"{CLASSES[classes[i]]} {level[i] / level.min():.1f}" for i in np.argsort(-level)[:3])
            print(
                f"seed {seed} {variant:>12} ({fitted:4.0f} s): validation AUSC {row[0]:.3f} | test AUSC {row[1]:.3f}, "
                f"AUROC {row[2]:.3f}, AUPRC {row[3]:.3f}; between-class share {row[4]:.2f}; most uncertain "
                f"(x the least): {top}",
                flush=True,
            )
    print(f"\nmean over seeds {args.seeds}:")
    for variant, rows in found.items():
        if rows:
            means = np.mean(rows, axis=0)
            print(f"  {variant:>12}: " + ", ".join(f"{m} {v:.3f}" for m, v in zip(METRICS, means)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
