"""Training throughput on the paper's FashionMNIST CNN (images per second).

Prints, from one run: images/s of plain contrastive training (``train_contrastive``,
Adam, loss on all pairs) at batch 256 and at batch 64, each with the default and the
channels_last layout of the convolution weights; the same at batch 256 (channels_last)
with the paper's loss on the pairs of the margin-violating triplets, computed from
per-pair triplet counts (``lam_plugin.losses``, what training uses) and through
pytorch-metric-learning's miner and ``ContrastiveLoss`` (every triplet materialised);
images/s of the online-LAM step (``OnlineLaplace.step``: sampled last layer, loss,
closed-form GGN at the sampled weights) at batch 64 (channels_last), and the ratio
online-LAM / plain training at the same batch size and layout. Medians over repeats.
With ``--device cuda`` every timing runs on the GPU, after one untimed warm-up of each
kind, and ends with a ``torch.cuda.synchronize()``.

    python benchmarks/training.py [--images 4096] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from pytorch_metric_learning.miners import TripletMarginMiner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fashionmnist_or_random


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    device = torch.device(args.device)
    torch.set_num_threads(2)
    from lam_plugin import LaplaceEmbedder
    from lam_study.models import fashionmnist_net
    from lam_study.training import train_contrastive

    x, y, source = fashionmnist_or_random(args.images)

    triplets = TripletMarginMiner(margin=0.7, type_of_triplets="all")

    def elapsed(t0: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def plain(batch: int, channels_last: bool = False, miner: Any = None) -> float:
        model = fashionmnist_net(3).to(device)
        if channels_last:  # what `lam-study reproduce` does with its networks
            model = model.to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        train_contrastive(model, x, y, epochs=1, batch_size=batch, miner=miner, device=device, progress=False)
        return args.images / elapsed(t0)

    def online(batch: int) -> float:
        model = fashionmnist_net(3).to(device, memory_format=torch.channels_last)
        trainer = LaplaceEmbedder(model, progress=False).online(x[:batch], dataset_size=args.images)
        model.train()
        t0 = time.perf_counter()
        for start in range(0, args.images, batch):
            trainer.step(x[start : start + batch], y[start : start + batch])
        return args.images / elapsed(t0)

    if device.type == "cuda":  # kernels chosen and compiled before any timing
        plain(256, True, triplets)
        plain(64, True)
        online(64)

    rates = {
        "plain, batch 256": statistics.median(plain(256) for _ in range(args.repeats)),
        "plain, batch 256, ch-last": statistics.median(plain(256, True) for _ in range(args.repeats)),
        "triplets, batch 256, counts": statistics.median(plain(256, True, triplets) for _ in range(args.repeats)),
        # a plain callable is not recognised as the triplet miner: the library path
        "triplets, batch 256, PML": statistics.median(
            plain(256, True, lambda e, t: triplets(e, t)) for _ in range(args.repeats)
        ),
        "plain, batch 64": statistics.median(plain(64) for _ in range(args.repeats)),
        "plain, batch 64, ch-last": statistics.median(plain(64, True) for _ in range(args.repeats)),
        "online LAM step, batch 64": statistics.median(online(64) for _ in range(args.repeats)),
    }
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "2 threads"
    print(f"data: {source}, {args.images} images; torch {torch.__version__}, {where}; median of {args.repeats}")
    for name, rate in rates.items():
        print(f"  {name:<30}{rate:>10.0f} images/s")
    speedup = rates["triplets, batch 256, counts"] / rates["triplets, batch 256, PML"]
    print(f"  triplet loss from counts / through the PML miner (batch 256, ch-last) = {speedup:.2f}x the throughput")
    ratio = rates["online LAM step, batch 64"] / rates["plain, batch 64, ch-last"]
    print(f"  online LAM / plain (batch 64, both channels_last) = {ratio:.3f} of the plain throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
