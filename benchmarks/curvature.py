"""Curvature fit speed and memory on the paper's FashionMNIST CNN (2 CPU cores).

Prints, from one run:
  * subset="all", batches of 64, all pairs: BackPACK-path fit time / torch.func-path
    fit time (target <= 0.5), BackPACK-path fit time / BackPACK DiagGGNExact on the
    same stacked batch without cross terms (the speed of light; target <= 3), and the
    peak memory of each;
  * subset="last_layer": fit time over 10,000 images / one plain forward pass over them
    (target <= 1.5), and sample(x, n=30) time / one plain forward pass (target <= 1.5).

Each measurement runs in its own subprocess so that its peak resident memory
(``ru_maxrss`` above the process's baseline after setup) is its own. Times are medians
over repeats. Usage: ``python benchmarks/curvature.py [--batches 8] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fashionmnist_or_random


def _model() -> torch.nn.Module:
    from lam_study.models import fashionmnist_net

    torch.manual_seed(0)
    return fashionmnist_net(embedding_dim=3, normalize=False).eval()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure(kind: str, batches: int, repeats: int, queue: mp.Queue) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from lam_plugin import LaplaceEmbedder

    model = _model()
    n = 10_000 if kind.startswith("last_layer") or kind == "forward" else 64 * batches
    x, y, source = fashionmnist_or_random(n)
    loader = list(zip(x.split(64 if n < 10_000 else 1000), y.split(64 if n < 10_000 else 1000)))
    if kind == "sample":
        post = LaplaceEmbedder(model, progress=False).fit(loader[:1])
    base = _rss_mb()
    run: Callable[[], object]
    if kind in ("backpack", "torch.func"):
        lam = LaplaceEmbedder(model, subset="all", backend=kind, progress=False)
        run = lambda: lam.fit(loader)  # noqa: E731
    elif kind == "diag_ggn":
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        net = extend(_model())
        loss_fn = extend(torch.nn.MSELoss(reduction="sum"))

        def run() -> None:
            for xb, _ in loader:
                out = net(xb)
                with backpack(DiagGGNExact()):
                    loss_fn(out, torch.zeros_like(out)).backward()
                for p in net.parameters():
                    p.grad = None
                    del p.diag_ggn_exact

    elif kind == "last_layer":
        lam = LaplaceEmbedder(model, subset="last_layer", progress=False)
        run = lambda: lam.fit(loader)  # noqa: E731
    elif kind == "forward":

        def run() -> None:
            with torch.no_grad():
                for xb, _ in loader:
                    model(xb)

    elif kind == "sample":

        def run() -> None:
            for xb, _ in loader:
                post.sample(xb, n=30)

    else:
        raise ValueError(kind)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    queue.put({"kind": kind, "time": statistics.median(times), "peak_mb": _rss_mb() - base, "data": source})


def measure(kind: str, batches: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(kind, batches, repeats, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8, help="batches of 64 for the subset='all' fits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    r = {k: measure(k, args.batches, args.repeats) for k in ("backpack", "torch.func", "diag_ggn", "last_layer", "forward", "sample")}
    print(f"data: {r['backpack']['data']}; torch {torch.__version__}, {os.environ.get('BENCH_THREADS', '2')} threads; "
          f"median of {args.repeats} runs")
    print(f"\nsubset='all', paper CNN, {args.batches} batches of 64, all pairs, arccos + fix")
    print(f"  {'path':<28}{'time (s)':>10}{'peak (MB)':>12}")
    for k, label in (("backpack", "BackPACK (pair factors)"), ("torch.func", "torch.func"), ("diag_ggn", "BackPACK DiagGGNExact")):
        print(f"  {label:<28}{r[k]['time']:>10.3f}{r[k]['peak_mb']:>12.1f}")
    ratio_func = r["backpack"]["time"] / r["torch.func"]["time"]
    ratio_sol = r["backpack"]["time"] / r["diag_ggn"]["time"]
    print(f"  BackPACK / torch.func          = {ratio_func:.3f}  (target <= 0.5)")
    print(f"  BackPACK / DiagGGNExact        = {ratio_sol:.3f}  (target <= 3)")
    print("\nsubset='last_layer', 10,000 images")
    ratio_fit = r["last_layer"]["time"] / r["forward"]["time"]
    ratio_sample = r["sample"]["time"] / r["forward"]["time"]
    print(f"  plain forward pass             = {r['forward']['time']:.3f} s")
    print(f"  fit / forward                  = {ratio_fit:.3f}  (target <= 1.5)")
    print(f"  sample(n=30) / forward         = {ratio_sample:.3f}  (target <= 1.5)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw": r, "ratios": {"backpack/torch.func": ratio_func, "backpack/diag_ggn": ratio_sol,
                                             "last_layer_fit/forward": ratio_fit, "sample30/forward": ratio_sample}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
