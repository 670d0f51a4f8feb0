"""Does a posterior over every layer detect MNIST better than the last-layer one?

A diagnostic, not a benchmark. For the online-LAM networks that ``lam-study reproduce
fashionmnist`` cached (``--key``: the hash in their file names), it fits the curvature
again at each network's final weights over the parameter subset ``--subset``
(``last_layer``, the protocol's, or ``all``: both convolutions too), with every pair of
each batch and the ``--approx`` of the arccos loss (``pos``: the ``--online-posterior
refit --posthoc-approx pos`` of ``reproduce``). The prior precision is ``--prior``
(a number, or ``marglik``: the marginal-likelihood optimum); the temperature
is chosen on validation ECE as ``reproduce`` does. It prints, per parameter tensor, the
share of weights whose curvature is below the prior precision (their spread is the
prior's) and exactly 0; then the fit, calibration and prediction times and the AUROC,
AUPRC and AUSC on ``--limit`` FashionMNIST test images against as many MNIST digits,
with ``--samples`` weight samples.

A posterior over every layer samples whole networks (``torch.func.vmap``), so on the
CPU one seed with ``--limit 2000 --samples 30`` takes about 10-15 minutes, most of it the
calibration. The OoD data are used here to explain a number, never to choose a setting.

    python benchmarks/posterior_subset.py --key 05dbf0cb6b --seeds 12 --subset all --prior 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin import LaplaceEmbedder, metrics
from lam_plugin.calibration import calibrate_temperature
from lam_plugin.posterior import EmbeddingPosterior
from lam_plugin.prior import marglik_prior_precision
from lam_study.reproduce import ReproduceConfig, load_fashionmnist_protocol
from lam_study.reproduce.config import CALIBRATION_TEMPERATURES
from lam_study.reproduce.protocol import _prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_scores import _net


def _print_prior_share(net: torch.nn.Module, posterior: EmbeddingPosterior, prior: float) -> None:
    """Per parameter tensor of the posterior: the share of weights whose curvature is below the
    prior precision (their spread is the prior's) and exactly 0 (no pair moves them)."""
    params = dict(net.named_parameters())
    start = 0
    for name in posterior.param_names:
        n = params[name].numel()
        h = posterior.curvature[start : start + n]
        start += n
        print(
            f"  {name:>10} {n:6,} weights: curvature < prior {float((h < prior).float().mean()):.2f}, "
            f"= 0 {float((h == 0).float().mean()):.2f}; median |weight| {float(params[name].detach().abs().median()):.2g}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/fashionmnist/cache"))
    parser.add_argument("--key", required=True, help="the hash of the cached online-LAM networks, e.g. 05dbf0cb6b")
    parser.add_argument("--seeds", type=int, nargs="+", default=[12])
    parser.add_argument("--subset", choices=["last_layer", "all"], default="all")
    parser.add_argument("--approx", choices=["fix", "pos", "full"], default="pos")
    parser.add_argument("--prior", default="1", help="prior precision: a number or 'marglik'")
    parser.add_argument("--limit", type=int, default=2000, help="test images and MNIST digits (0: all)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--calibration-images", type=int, default=500, help="validation images for the temperature")
    args = parser.parse_args(argv)
    if args.prior != "marglik":
        try:
            valid = float(args.prior) > 0
        except ValueError:
            valid = False
        if not valid:
            parser.error(f"--prior must be a positive number or 'marglik', got {args.prior!r}")
    config = ReproduceConfig()
    data = _prepare(load_fashionmnist_protocol(), config)
    test_x, test_y, ood_x = data.test_x, data.test_y, data.ood_x
    if args.limit:
        g = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(test_x), generator=g)[: args.limit]
        test_x, test_y = test_x[keep], test_y[keep]
        ood_x = ood_x[torch.randperm(len(ood_x), generator=g)[: args.limit]]
    for seed in args.seeds:
        net_path = args.cache / f"lam_online-seed{seed}-{args.key}.safetensors"
        if not net_path.is_file():
            raise SystemExit(f"not found: {net_path}")
        net = _net(net_path)
        # the loader of reproduce's refit: batches of lam_batch_size, shuffled by the seed
        loader = DataLoader(
            TensorDataset(data.fit_x, data.fit_y), batch_size=config.lam_batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        lam = LaplaceEmbedder(
            net, subset=args.subset, approx=args.approx, geometry="arccos", margin=config.margin, miner="all",
            max_pairs=config.max_pairs, progress=False, seed=seed,
        )
        start = time.perf_counter()
        fitted = lam.fit(loader)
        fit_s = time.perf_counter() - start
        if args.prior == "marglik":
            prior = marglik_prior_precision(fitted.curvature, fitted.mean, len(data.fit_x), 3)
        else:
            prior = float(args.prior)
        posterior = EmbeddingPosterior(
            net, fitted.param_names, fitted.curvature, prior, mean=fitted.mean, config=fitted.config
        )
        _print_prior_share(net, fitted, prior)
        start = time.perf_counter()
        n_cal = args.calibration_images
        posterior, report = calibrate_temperature(
            posterior, data.val_x[:n_cal], data.val_y[:n_cal], temperatures=CALIBRATION_TEMPERATURES,
            n=min(args.samples, 30), seed=seed,
        )
        calibration_s = time.perf_counter() - start
        start = time.perf_counter()
        test = posterior.predict(test_x, n=args.samples, generator=torch.Generator().manual_seed(seed), batch_size=1000)
        ood = posterior.predict(ood_x, n=args.samples, generator=torch.Generator().manual_seed(seed), batch_size=1000)
        predict_s = time.perf_counter() - start
        print(
            f"seed {seed} subset {args.subset} ({len(fitted.mean):,} weights), {args.approx}, prior {prior:.3g}, "
            f"temperature {report.temperature:g}: fit {fit_s:.0f} s, calibration {calibration_s:.0f} s, "
            f"prediction {predict_s:.0f} s | AUROC {metrics.auroc(test.uncertainty, ood.uncertainty):.3f}, "
            f"AUPRC {metrics.auprc(test.uncertainty, ood.uncertainty):.3f}, "
            f"AUSC {metrics.ausc(test.mean, test.std, test_y.numpy()):.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
