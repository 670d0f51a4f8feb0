"""What subnormal floats cost on the CPU, and what flushing them to zero saves.

Times, with trained weights of the paper's FashionMNIST CNN, the forward pass over
``--images`` images (eval) and the online-LAM step at batch 64, each with subnormals
kept and flushed to zero (``lam_plugin.numerics.flush_denormals``, which the library's
training loops and ``lam-study reproduce`` use). Medians over repeats, and the ratios.

    python benchmarks/denormals.py --weights runs/fashionmnist/cache/lam_online-seed1-<hash>.safetensors

Without ``--weights`` the network is untrained, which has few subnormals: the point of
the script is the trained case.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fashionmnist_or_random


def _median_seconds(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="a safetensors state dict of fashionmnist_net(3)")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="online-LAM steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from lam_plugin import LaplaceEmbedder
    from lam_plugin.online import OnlineLaplace
    from lam_study.models import fashionmnist_net

    x, y, source = fashionmnist_or_random(max(args.images, 64 * args.steps))

    def network() -> torch.nn.Module:
        net = fashionmnist_net(3).to(memory_format=torch.channels_last)
        if args.weights:
            net.load_state_dict(load_file(args.weights))
        return net

    def forward() -> None:
        net = network().eval()
        with torch.no_grad():
            for start in range(0, args.images, 1024):
                net(x[start : start + 1024])

    raw_step = OnlineLaplace.step.__wrapped__  # type: ignore[attr-defined]  # without its flush_denormals

    def online() -> None:
        net = network()
        trainer = LaplaceEmbedder(net, progress=False).online(x[:64], dataset_size=54_000)
        net.train()
        for i in range(args.steps):
            raw_step(trainer, x[64 * i : 64 * (i + 1)], y[64 * i : 64 * (i + 1)])

    print(
        f"data: {source}; weights: {args.weights or 'untrained'}; torch {torch.__version__}, "
        f"{args.threads} threads; median of {args.repeats}"
    )
    for name, fn, per in (("forward (eval)", forward, f"{args.images} images"), ("online-LAM step", online, f"{args.steps} steps")):
        seconds = {}
        for flush in (False, True):
            if not torch.set_flush_denormal(flush) and flush:
                print("this CPU cannot flush subnormal floats")
                return 1
            seconds[flush] = _median_seconds(fn, args.repeats)
        torch.set_flush_denormal(False)
        print(
            f"  {name:<16} kept {seconds[False]:7.3f} s, flushed {seconds[True]:7.3f} s per {per}: "
            f"flushing is {seconds[False] / seconds[True]:.2f}x faster"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
