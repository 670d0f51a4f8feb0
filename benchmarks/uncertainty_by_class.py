"""Does a posterior's in-distribution uncertainty rank its own retrieval errors?

A diagnostic, not a benchmark: for the online-LAM posteriors that ``lam-plugin
reproduce fashionmnist`` cached (``--cache``, default ``runs/fashionmnist/cache``;
``--key``: the hash in their file names), with ``--refit-key`` the posteriors refitted
at those networks' final weights (``--online-posterior refit``), or with ``--posthoc-key``
its post-hoc LAM fits of the deterministic networks (``--key``: their networks' hash), it
embeds the FashionMNIST test split (``--samples`` weight samples, the posterior tempered
by ``--temperature``) and prints, per seed:

* AUSC (``lam_plugin.metrics.ausc``);
* the AUROC of the AUSC's per-query uncertainty, ``mean_d(std_query + std_neighbour)``,
  as a detector of the query's 1-NN error, over all queries and within each class
  (mean over the classes), which is what the sparsification curve integrates;
* the between-class share of that uncertainty's variance: how much of it is a
  per-class level rather than a per-image signal;
* with ``--per-class``: each class's 1-NN accuracy and mean uncertainty, and what sets
  that uncertainty's size: the mean length of the network's output ``|u|`` before the
  normalisation (at the posterior mean), the output's spread ``sqrt(sum_d Var u_d)``
  over the weight samples (``Prediction.output_uncertainty``), and the length of the
  last layer's input features.

    python benchmarks/uncertainty_by_class.py --key 05dbf0cb6b [--seeds 1 2 3 4 5] [--per-class]
    python benchmarks/uncertainty_by_class.py --key 05dbf0cb6b --refit-key 1e8a5f9f2a --seeds 6 7 8 9 10 --temperature 1
    python benchmarks/uncertainty_by_class.py --key addb843424 --posthoc-key ed6c0a4965 --temperature 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from lam_plugin import metrics
from lam_plugin.posterior import EmbeddingPosterior
from lam_study.data import load_fashionmnist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_scores import _features, _net


def class_levels(
    mean: np.ndarray, std: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """The AUSC's per-query uncertainty and how much of it is a per-class level.

    Returns ``(error [N], uncertainty [N], classes [C], level [C], between)``: each
    query's 1-NN error, its uncertainty ``mean_d(std_query + std_neighbour)``, the
    classes, each class's mean uncertainty, and the between-class share of the
    uncertainty's variance ``sum_c p_c (level_c - mean)^2 / Var``.
    """
    neighbour = metrics.nearest_neighbours(mean, 1)[:, 0]
    error = labels[neighbour] != labels
    uncertainty = (std + std[neighbour]).mean(axis=1)
    classes = np.unique(labels)
    level = np.array([uncertainty[labels == c].mean() for c in classes])
    share = np.array([(labels == c).mean() for c in classes])
    between = float((share * (level - uncertainty.mean()) ** 2).sum() / uncertainty.var())
    return error, uncertainty, classes, level, between


def _report(
    name: str, mean: np.ndarray, std: np.ndarray, labels: np.ndarray, sizes: dict[str, np.ndarray] | None
) -> None:
    error, uncertainty, classes, level, between = class_levels(mean, std, labels)
    within = [
        roc_auc_score(error[labels == c], uncertainty[labels == c])
        for c in classes
        if 0 < error[labels == c].mean() < 1
    ]
    print(
        f"{name}: AUSC {metrics.ausc(mean, std, labels):.3f}, error-vs-uncertainty AUROC "
        f"{roc_auc_score(error, uncertainty):.3f} overall, {np.mean(within):.3f} within classes; "
        f"between-class share of its variance {between:.2f}"
    )
    if sizes is not None:
        for i in np.argsort(-level):
            m = labels == classes[i]
            extra = ", ".join(f"{k} {v[m].mean():.4g}" for k, v in sizes.items())
            print(f"    class {classes[i]}: 1-NN accuracy {1 - error[m].mean():.3f}, mean uncertainty {level[i]:.4g}; {extra}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/fashionmnist/cache"))
    parser.add_argument("--key", required=True, help="the hash of the online-LAM files, e.g. 05dbf0cb6b "
                        "(with --posthoc-key: of the deterministic networks, e.g. addb843424)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--posthoc-key", help="read post-hoc LAM fits (lam_posthoc-seedS-KEY) of the deterministic "
                        "networks instead of online LAM, e.g. ed6c0a4965")
    which.add_argument("--refit-key", help="read the refitted posteriors (lam_online-seedS-KEY.refit) of the "
                        "online-LAM networks instead of their running curvature, e.g. 1e8a5f9f2a")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1e3, help="default: what validation chose for every seed")
    parser.add_argument("--per-class", action="store_true")
    args = parser.parse_args(argv)
    test = load_fashionmnist(split="test")
    x, labels = test.float(), test.labels.numpy()
    for seed in args.seeds:
        if args.posthoc_key:
            net_path = args.cache / f"deterministic-seed{seed}-{args.key}.safetensors"
            post_path = args.cache / f"lam_posthoc-seed{seed}-{args.posthoc_key}.safetensors"
        else:
            net_path = args.cache / f"lam_online-seed{seed}-{args.key}.safetensors"
            post_path = (
                args.cache / f"lam_online-seed{seed}-{args.refit_key}.refit.safetensors"
                if args.refit_key
                else net_path.with_suffix(".posterior.safetensors")
            )
        if not (net_path.is_file() and post_path.is_file()):
            raise SystemExit(f"not found: {net_path} and {post_path}")
        net = _net(net_path)
        posterior = EmbeddingPosterior.load(post_path, net).tempered(args.temperature)
        pred = posterior.predict(x, n=args.samples, generator=torch.Generator().manual_seed(seed), batch_size=2000)
        sizes = None
        if args.per_class:
            features = _features(net, x)
            with torch.no_grad():
                output = net[-1](features)
            spread = pred.output_uncertainty
            sizes = {
                "|u|": output.norm(dim=1).numpy(),
                "sqrt(sum Var u)": spread.sqrt().numpy() if spread is not None else np.full(len(x), np.nan),
                "|features|": features.norm(dim=1).numpy(),
            }
        _report(f"seed {seed}", pred.mean.numpy(), pred.std.numpy(), labels, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
