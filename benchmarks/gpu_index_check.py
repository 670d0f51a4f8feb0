"""End-to-end check of ``UncertainIndex(device="cuda")`` against the CPU index.

Builds Flat and IVF indexes of 200,000 items on the GPU and on the CPU from the same
gallery (``Prediction`` objects, no model), searches the same queries and prints
timings. Then 1,000,000 items of dimension 128 in ``IVF1024,PQ16`` with 3-bit
variances, streamed in 20 adds that the GPU copy takes itself (not copied again), on
one GPU and, where there are several, on all of them replicated and sharded
(``device="cuda:all"``). Exits with status 1 when the neighbours or their variances
disagree with the CPU index (2 when there is no CUDA device or faiss lacks GPU
support). Run on a GPU machine: ``python benchmarks/gpu_index_check.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time

import faiss
import numpy as np
import torch

from lam_plugin.index import UncertainIndex
from lam_plugin.prediction import Prediction

N_ITEMS, DIM, N_QUERIES, K = 200_000, 128, 2_000, 10
#: FAISS GPU and CPU kernels sum in different orders: near-ties may swap.
MIN_ID_AGREEMENT = 0.995
#: PQ on the GPU uses other lookup-table arithmetic: more near-ties swap.
MIN_PQ_ID_AGREEMENT = 0.95
N_LARGE, LARGE_FACTORY, LARGE_PARAMS, LARGE_PARTS = 1_000_000, "IVF1024,PQ16", "nprobe=16", 20


def random_prediction(n: int, rng: np.random.Generator) -> Prediction:
    mean = rng.standard_normal((n, DIM), dtype=np.float32)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    std = rng.uniform(0.0, 0.05, size=(n, DIM)).astype(np.float32)
    return Prediction(mean=torch.from_numpy(mean), std=torch.from_numpy(std))


def rows_of(pred: Prediction, rows: np.ndarray) -> Prediction:
    return Prediction(mean=pred.mean[rows], std=pred.std[rows])


def compare(name: str, cpu, gpu, min_agreement: float, timings: str) -> bool:
    """Print how far the GPU results are from the CPU ones; whether they are close enough."""
    same = cpu.ids == gpu.ids
    var_err = float(np.max(np.abs(gpu.variances[same] - cpu.variances[same]) / np.maximum(cpu.variances[same], 1e-12)))
    dist_err = float(np.max(np.abs(gpu.distances[same] - cpu.distances[same])))
    ok = same.mean() >= min_agreement and var_err < 1e-3 and dist_err < 1e-3
    print(f"{name:<28} {timings} | ids agree {same.mean():.4f}, max rel var err {var_err:.2e}, "
          f"max dist err {dist_err:.2e} {'OK' if ok else 'MISMATCH'}")
    return ok


def build_and_search(index: UncertainIndex, gallery: Prediction, queries: Prediction, results: dict, device: str, shard: bool) -> bool:
    """Add ``gallery`` in parts, search ``queries``, time both; whether the results agree with the CPU's."""
    start = time.perf_counter()
    for rows in np.array_split(np.arange(len(gallery)), LARGE_PARTS):
        index.add(rows_of(gallery, rows))
    added = time.perf_counter() - start
    index.set_search_parameters(LARGE_PARAMS)
    index.search(queries, K)  # warm-up
    start = time.perf_counter()
    results[device, shard] = index.search(queries, K, return_probabilities=True)
    searched = time.perf_counter() - start
    timings = f"add {len(gallery)} in {LARGE_PARTS} parts {added:.1f}s, search {searched * 1e3:.1f}ms"
    name = f"{LARGE_FACTORY} {device}{' sharded' if shard else ''}"
    if device == "cpu":
        print(f"{name:<28} {timings}")
        return True
    return compare(name, results["cpu", False], results[device, shard], MIN_PQ_ID_AGREEMENT, timings)


def million(queries: Prediction, rng: np.random.Generator) -> int:
    """The 1M-item IVF-PQ index on the CPU, one GPU and all GPUs; the number of mismatches."""
    gallery = random_prediction(N_LARGE, rng)
    placements = [("cpu", False), ("cuda", False)] + ([("cuda:all", False), ("cuda:all", True)] if faiss.get_num_gpus() > 1 else [])
    trained = UncertainIndex(index_factory=LARGE_FACTORY, variance_dtype="3bit", progress=False)
    trained.train(rows_of(gallery, np.arange(40 * 1024)))
    results, failures = {}, 0
    with tempfile.TemporaryDirectory() as folder:  # every placement starts from the same trained, empty index
        trained.save(f"{folder}/trained.safetensors")
        for device, shard in placements:
            index = UncertainIndex.load(f"{folder}/trained.safetensors", device=device, gpu_shards=shard, progress=False)
            failures += not build_and_search(index, gallery, queries, results, device, shard)
            del index
    return failures


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
        summary = (f"build cpu {timings['cpu'][0]:.2f}s gpu {timings['cuda'][0]:.2f}s | "
                   f"search cpu {timings['cpu'][1] * 1e3:.1f}ms gpu {timings['cuda'][1] * 1e3:.1f}ms")
        failures += not compare(factory, results["cpu"], results["cuda"], MIN_ID_AGREEMENT, summary)
    failures += million(queries, rng)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
