"""Memory of ``UncertainIndex.gather`` on the rank that receives the shards.

Each of the ranks of ``torch.distributed.run`` trains its shard with the others
(``train(across_ranks=True)``), adds ``N`` random items of dimension 128 to an
``IVF256,PQ16`` index with 3-bit variances, and calls ``gather()``. Rank 0 samples its
resident memory every 5 ms during the gather and prints how far it rose above what it
held before (the peak) and where it ended.

    python -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/gather_memory.py 200000
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from lam_plugin.index import UncertainIndex
from lam_plugin.prediction import Prediction

DIM, CHUNK = 128, 50_000


def resident() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(n: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)

    def items(m: int) -> Prediction:
        return Prediction(mean=torch.randn(m, DIM, generator=gen), std=0.05 * torch.rand(m, DIM, generator=gen))

    index = UncertainIndex(index_factory="IVF256,PQ16", variance_dtype="3bit", progress=False)
    index.train(items(10_000), across_ranks=True)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        index.add(items(stop - start), ids=np.arange(start, stop) + rank * n)
    dist.barrier()
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.005)

    before = resident()
    watcher = threading.Thread(target=watch)
    watcher.start()
    start_time = time.perf_counter()
    merged = index.gather()
    seconds = time.perf_counter() - start_time
    done.set()
    watcher.join()
    if merged is not None:
        mib = 2.0**20
        print(
            f"{dist.get_world_size()} ranks x {n} items gathered on rank 0 ({len(merged)} items) in {seconds:.1f} s: "
            f"resident {before / mib:.0f} MiB before, +{(peak[0] - before) / mib:.0f} MiB at the peak, "
            f"+{(resident() - before) / mib:.0f} MiB after"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
