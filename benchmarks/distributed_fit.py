"""Distributed fit on the CPU: 2 gloo ranks against one process over the same batches.

One process fits the posterior over all batches; then ``torch.distributed.run`` starts
2 ranks that each fit their half (every other batch). Each rank times its whole fit and,
inside it, the collective work the process group adds: the check that the ranks fit the
same configuration (one ``all_gather_object``) and the all-reduce of the curvature and
pair counts, and then the all-reduce alone with the ranks in step. Printed: the
single-process fit time, each rank's fit time, the collective time and its share of the
rank's fit, the all-reduce alone, and the relative difference of the reduced
curvature from the single-process one (target: 1e-5). Each of ``--repeats`` rounds runs
both; the table shows medians.

Usage: ``python benchmarks/distributed_fit.py [--batches 12] [--batch-size 32] [--repeats 3]``.
The model is the paper's FashionMNIST network (embedding dimension 16) on random images,
``subset="all"`` (BackPACK).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lam_plugin import L2Normalize, LaplaceEmbedder
from lam_plugin import distributed as lam_distributed


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(9216, 16), L2Normalize(),
    )


def batches(n: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def fit(data: list, subset: str) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    posterior = LaplaceEmbedder(network(), subset=subset, approx="pos", progress=False).fit(data)
    return time.perf_counter() - start, posterior.curvature


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spent = {"collective": 0.0}

    def timed(fn):
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent["collective"] += time.perf_counter() - start

        return run

    lam_distributed.check_same_everywhere = timed(lam_distributed.check_same_everywhere)
    lam_distributed.sum_over_ranks = timed(lam_distributed.sum_over_ranks)
    seconds, curvature = fit(batches(args.batches, args.batch_size)[rank::world], args.subset)
    if rank == 0:
        torch.save(curvature, Path(args.out) / "curvature.pt")
    # the all-reduce alone, with the ranks in step (the collectives above include the wait
    # for the slower rank's shard)
    alone = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        lam_distributed.sum_over_ranks(curvature.double(), [0] * 6)
        alone.append(time.perf_counter() - start)
    report = {"rank": rank, "fit": seconds, "collective": spent["collective"], "allreduce": statistics.median(alone)}
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def one_round(args: argparse.Namespace) -> dict:
    torch.set_num_threads(2)
    single, reference = fit(batches(args.batches, args.batch_size), args.subset)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__]
        flags = ["--worker", "--out", out, "--batches", str(args.batches), "--batch-size", str(args.batch_size)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([*command, *flags, "--subset", args.subset], check=True, env=env, capture_output=True)
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]
        reduced = torch.load(Path(out) / "curvature.pt")
    relerr = float((reduced - reference).norm() / reference.norm())
    return {
        "single": single,
        "rank_fit": max(r["fit"] for r in ranks),
        "collective": max(r["collective"] for r in ranks),
        "allreduce": max(r["allreduce"] for r in ranks),
        "relerr": relerr,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--subset", default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rounds = [one_round(args) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"{args.batches} batches of {args.batch_size}, subset={args.subset!r}, {args.repeats} rounds (medians)")
    print(f"one process (2 threads), all batches:   {med['single']:.2f} s")
    print(f"2 gloo ranks (1 thread each), per rank: {med['rank_fit']:.2f} s")
    print(f"  of which the collectives:             {med['collective'] * 1000:.1f} ms "
          f"({100 * med['collective'] / med['rank_fit']:.2f} % of the rank's fit, with the wait for the other rank)")
    print(f"  the all-reduce alone, ranks in step:  {med['allreduce'] * 1000:.2f} ms")
    print(f"relative difference of the curvature:   {max(r['relerr'] for r in rounds):.2e} (largest)")


if __name__ == "__main__":
    main()
