"""Which part of a last-layer LAM posterior separates FashionMNIST test from MNIST?

A diagnostic, not a benchmark: it reads the networks and posteriors that
``lam-study reproduce fashionmnist`` cached (``--cache``, default
``runs/fashionmnist/cache``) and prints AUROC / AUPRC (OoD = positive) of several
per-image scores on the FashionMNIST test split against the MNIST OoD set:

* ``protocol``: the paper's score, sum_d std of the unit-norm samples (30 samples);
* ``output_var``: sum_d Var(u_d) of the output u before the normalisation, in closed form
  for the last layer, sum_{d,k} x_k^2 s2_dk + s2_bd (``Prediction.output_uncertainty`` is
  its Monte Carlo estimate);
* ``linearised``: ``output_var / |E u|^2``, the first-order effect of the normalisation;
* ``1/|E u|`` and ``|x|``: the length of the mean output and of the features alone.

For the post-hoc posterior it uses several prior precisions (each with the temperature
given on the command line; none with an empty ``--posthoc``), for online LAM its own
curvature or, with ``--refit-key``, the posterior refitted at its final weights
(``--online-posterior refit``). The OoD data are used here to explain a number, never to
choose a setting of the library.

    python benchmarks/ood_scores.py [--cache runs/fashionmnist/cache] [--seed 1] [--posthoc 1:1] [--posthoc-key HASH] [--det-key HASH]
    python benchmarks/ood_scores.py --seed 7 --posthoc --online-key 05dbf0cb6b --refit-key 1e8a5f9f2a --online-temperature 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import Tensor, nn

from lam_plugin.posterior import EmbeddingPosterior
from lam_study.data import load_fashionmnist, load_mnist
from lam_study.models import fashionmnist_net


def _one(cache: Path, pattern: str) -> Path:
    found = sorted(cache.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one file {pattern} in {cache}, found {[p.name for p in found]}")
    return found[0]


def _net(path: Path) -> nn.Sequential:
    net = fashionmnist_net(3, normalize=False)
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def _features(net: nn.Sequential, x: Tensor) -> Tensor:
    return torch.cat([net[:-1](x[i : i + 1000]).flatten(1) for i in range(0, len(x), 1000)])


def _scores(post: EmbeddingPosterior, f: Tensor, x: Tensor) -> dict[str, Tensor]:
    var = post.std.pow(2)
    w, b = post.mean[:-3].view(3, -1), post.mean[-3:]
    w_var, b_var = var[:-3].view(3, -1), var[-3:]
    output_var = (f.pow(2) @ w_var.T + b_var).sum(1)
    mean_norm = (f @ w.T + b).norm(dim=1)
    generator = torch.Generator().manual_seed(0)
    return {
        "protocol": post.predict(x, n=30, generator=generator, batch_size=2000).uncertainty,
        "output_var": output_var,
        "linearised": output_var / mean_norm.pow(2),
        "1/|E u|": 1 / mean_norm,
        "|x|": f.norm(dim=1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/fashionmnist/cache"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--posthoc", nargs="*", default=["92.95:0.1", "1:0.1", "1e4:1"],
                        help="prior:temperature pairs for the post-hoc posterior")
    parser.add_argument("--online-temperature", type=float, default=1e6)
    parser.add_argument("--posthoc-key", default="*",
                        help="the hash of the post-hoc fit to read, where the cache holds several (e.g. ed6c0a4965)")
    parser.add_argument("--det-key", default="*",
                        help="the hash of the deterministic network, where the cache holds several (e.g. addb843424)")
    parser.add_argument("--online-key", default="*",
                        help="the hash of the online-LAM network to read, where the cache holds several (e.g. 05dbf0cb6b)")
    parser.add_argument("--refit-key",
                        help="read the posterior refitted at the online network's weights (lam_online-seedS-KEY.refit)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    test, ood = load_fashionmnist(split="test"), load_mnist(split="test")
    xt, xo = test.float(), ood.float()
    labels = torch.cat([torch.zeros(len(xt)), torch.ones(len(xo))]).numpy()
    print(f"ID: {test.name} ({len(xt)}), OoD: {ood.name} ({len(xo)}); AUROC / AUPRC, OoD positive")

    def report(name: str, post: EmbeddingPosterior, net: nn.Sequential) -> None:
        ft, fo = _features(net, xt), _features(net, xo)
        st, so = _scores(post, ft, xt), _scores(post, fo, xo)
        row = {}
        for key in st:
            s = torch.cat([st[key], so[key]]).double().numpy()
            row[key] = [round(roc_auc_score(labels, s), 3), round(average_precision_score(labels, s), 3)]
        print(f"{name}: {json.dumps(row)}")

    s = args.seed
    if args.posthoc:
        det = _net(_one(args.cache, f"deterministic-seed{s}-{args.det_key}.safetensors"))
        base = EmbeddingPosterior.load(_one(args.cache, f"lam_posthoc-seed{s}-{args.posthoc_key}.safetensors"), det)
    for spec in args.posthoc:
        prior, temperature = (float(v) for v in spec.split(":"))
        post = EmbeddingPosterior(
            det, base.param_names, base.curvature, prior, mean=base.mean, config=base.config, stats=base.stats
        ).tempered(temperature)
        report(f"post-hoc, prior {prior:g}, temperature {temperature:g}", post, det)
    online_files = [
        p for p in args.cache.glob(f"lam_online-seed{s}-{args.online_key}.safetensors")
        if "posterior" not in p.name and "refit" not in p.name
    ]
    if len(online_files) == 1:
        onet = _net(online_files[0])
        if args.refit_key:
            opost = EmbeddingPosterior.load(_one(args.cache, f"lam_online-seed{s}-{args.refit_key}.refit.safetensors"), onet)
            name = "online, refit"
        else:
            opost = EmbeddingPosterior.load(online_files[0].with_suffix(".posterior.safetensors"), onet)
            name = "online"
        report(f"{name}, temperature {args.online_temperature:g}", opost.tempered(args.online_temperature), onet)
    elif args.refit_key or args.online_key != "*":
        raise SystemExit(f"expected one online-LAM network of seed {s} in {args.cache}, found {[p.name for p in online_files]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
