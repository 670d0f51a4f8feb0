"""End-to-end check of ``UncertainIndex(device="cuda")`` against the CPU index.

Builds Flat and IVF indexes on the GPU and on the CPU from the same gallery
(``Prediction`` objects, no model), searches the same queries, prints timings, and
exits with status 1 when the neighbours or their variances disagree (2 when there is no
CUDA device or faiss lacks GPU support). Run on a GPU machine:
``python benchmarks/gpu_index_check.py``.
"""

from __future__ import annotations

import sys
import time

import faiss
import numpy as np
import torch

from lam_plugin.index import UncertainIndex
from lam_plugin.prediction import Prediction

N_ITEMS, DIM, N_QUERIES, K = 200_000, 128, 2_000, 10
#: FAISS GPU and CPU kernels sum in different orders: near-ties may swap.
MIN_ID_AGREEMENT = 0.995


def random_prediction(n: int, rng: np.random.Generator) -> Prediction:
    mean = rng.standard_normal((n, DIM), dtype=np.float32)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    std = rng.uniform(0.0, 0.05, size=(n, DIM)).astype(np.float32)
    return Prediction(mean=torch.from_numpy(mean), std=torch.from_numpy(std))


def main() -> int:
    if not (torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        print(f"no CUDA device usable by faiss {faiss.__version__}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    gallery, queries = random_prediction(N_ITEMS, rng), random_prediction(N_QUERIES, rng)
    failures = 0
    for factory, params in (("Flat", None), ("IVF1024,Flat", "nprobe=32")):
        results, timings = {}, {}
        for device in ("cpu", "cuda"):
            start = time.perf_counter()
            index = UncertainIndex(index_factory=factory, device=device, progress=False).add(gallery)
            if params:
                index.set_search_parameters(params)
            built = time.perf_counter() - start
            index.search(queries, K)  # warm-up
            start = time.perf_counter()
            results[device] = index.search(queries, K, return_probabilities=True)
            timings[device] = (built, time.perf_counter() - start)
        cpu, gpu = results["cpu"], results["cuda"]
        same = cpu.ids == gpu.ids
        var_err = float(np.max(np.abs(gpu.variances[same] - cpu.variances[same]) / np.maximum(cpu.variances[same], 1e-12)))
        dist_err = float(np.max(np.abs(gpu.distances[same] - cpu.distances[same])))
        ok = same.mean() >= MIN_ID_AGREEMENT and var_err < 1e-3 and dist_err < 1e-4
        failures += not ok
        print(
            f"{factory:<14} build cpu {timings['cpu'][0]:.2f}s gpu {timings['cuda'][0]:.2f}s | "
            f"search cpu {timings['cpu'][1] * 1e3:.1f}ms gpu {timings['cuda'][1] * 1e3:.1f}ms | "
            f"ids agree {same.mean():.4f}, max rel var err {var_err:.2e}, max dist err {dist_err:.2e} "
            f"{'OK' if ok else 'MISMATCH'}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
