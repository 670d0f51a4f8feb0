"""Last-layer closed form at real sizes: fit time over one forward, and peak memory.

Model: ``Sequential(Linear(F=2048 -> D), L2Normalize())`` on random features, 10 batches
of 64 with labels drawn from 8 classes per batch, ``subset="last_layer"``, ``arccos``,
for D = 128, 512, 2048 and ``approx`` fix / pos / full (and ``full`` with
``hinge=False``, where every negative pair counts: the most pairs a batch can have; the
study's ``PaperLaplaceEmbedder``, whose only difference is that option).
Targets at D = 512: fit / forward <= 10 (fix), 50 (pos), 300 (full); each fit adds
<= 1.5 GB.

Each configuration runs in its own subprocess. There, each of ``--repeats`` rounds
times the forward pass over the 10 batches (median of 5) and then one fit
(``LaplaceEmbedder(...).fit``); the table shows the medians of the forward times, of the
fit times and of the per-round ratios (a round's ratio compares times taken seconds
apart, which matters on a shared machine). The peak memory is the rise of the maximum
resident set size (``ru_maxrss``) over its value after setup and one forward pass.
Usage: ``python benchmarks/last_layer.py [--dims 128 512 2048] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

FEATURES, BATCH, BATCHES, CLASSES = 2048, 64, 10, 8
TARGETS = {"fix": 10.0, "pos": 50.0, "full": 300.0}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _measure(dim: int, approx: str, hinge: bool, repeats: int, queue: mp.Queue) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from lam_plugin import L2Normalize
    from lam_study.paper import PaperLaplaceEmbedder

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, dim), L2Normalize()).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(BATCH, FEATURES, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen))
        for _ in range(BATCHES)
    ]

    def forward() -> None:
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    lam = PaperLaplaceEmbedder(model, approx=approx, hinge=hinge, progress=False)
    forward()
    base = _rss_mb()
    forwards, fits = [], []
    for _ in range(repeats):
        forwards.append(statistics.median(_time(forward) for _ in range(5)))
        fits.append(_time(lambda: lam.fit(batches)))
    stats = lam.posterior.stats  # type: ignore[union-attr]
    queue.put({
        "forward_s": statistics.median(forwards), "fit_s": statistics.median(fits),
        "ratio": statistics.median(f / g for f, g in zip(fits, forwards)),
        "peak_mb": _rss_mb() - base, "backend": stats.backend,
        "pairs": (stats.n_positive + stats.n_negative_active) / stats.n_batches,
    })


def measure(dim: int, approx: str, hinge: bool, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(dim, approx, hinge, repeats, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"Linear({FEATURES} -> D) + L2Normalize, {BATCHES} batches of {BATCH}, {CLASSES} classes, arccos; "
          f"torch {torch.__version__}, {os.environ.get('BENCH_THREADS', '2')} threads; "
          f"medians of {args.repeats} fits; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"{'D':>5} {'approx':<16}{'pairs/batch':>12}{'forward (ms)':>14}{'fit (ms)':>11}"
          f"{'fit/forward':>13}{'peak (MB)':>11}  target")
    for dim in args.dims:
        for approx, hinge in (("fix", True), ("pos", True), ("full", True), ("full", False)):
            r = measure(dim, approx, hinge, args.repeats)
            ratio = r["ratio"]
            label = approx if hinge else f"{approx}, hinge=False"
            target = f"<= {TARGETS[approx]:g}" if dim == 512 else ""
            print(f"{dim:>5} {label:<16}{r['pairs']:>12.0f}{1e3 * r['forward_s']:>14.2f}{1e3 * r['fit_s']:>11.1f}"
                  f"{ratio:>13.1f}{r['peak_mb']:>11.1f}  {target}", flush=True)
            if r["backend"] != "last_layer":
                print(f"      (backend {r['backend']!r}, not the closed form)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
