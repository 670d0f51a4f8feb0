"""Cost of the variances: ``UncertainIndex.search`` against a plain FAISS search.

Gallery: 100,000 random unit vectors of dimension 128 with random per-dimension std;
1,000 queries given as ``Prediction`` objects; k = 10. For each index type, the median
over the repeats of the ``search`` time (with variances, closed form) divided by the
median time of a plain FAISS search of the same vectors with the same parameters:

* Flat: a fresh ``faiss.IndexFlatL2``;
* IVF: a clone of the ``UncertainIndex``'s own trained ``IVF1024,Flat`` index, same nprobe.

Also the bytes held per gallery item beside the FAISS index (ids, variances, sums).
Run: ``python benchmarks/index.py [--repeats 7] [--nprobe 16]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch

from lam_plugin.index import UncertainIndex
from lam_plugin.prediction import Prediction

N_ITEMS, DIM, N_QUERIES, K = 100_000, 128, 1_000, 10


def random_prediction(n: int, rng: np.random.Generator) -> Prediction:
    mean = rng.standard_normal((n, DIM), dtype=np.float32)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    std = rng.uniform(0.0, 0.05, size=(n, DIM)).astype(np.float32)
    return Prediction(mean=torch.from_numpy(mean), std=torch.from_numpy(std))


def median_ratio(ours: Callable[[], object], plain: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``plain``, timed alternately after one warm-up each."""
    ours(), plain()
    t_ours, t_plain = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (plain, t_plain)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--nprobe", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rng = np.random.default_rng(0)
    gallery, queries = random_prediction(N_ITEMS, rng), random_prediction(N_QUERIES, rng)
    gallery_means, query_means = gallery.mean.numpy(), queries.mean.numpy()

    rows = []
    flat = UncertainIndex(progress=False).add(gallery)
    plain_flat = faiss.IndexFlatL2(DIM)
    plain_flat.add(gallery_means)
    ours, plain = median_ratio(lambda: flat.search(queries, K), lambda: plain_flat.search(query_means, K), args.repeats)
    rows.append(("Flat", ours, plain))

    ivf = UncertainIndex(index_factory="IVF1024,Flat", progress=False).add(gallery)
    ivf.set_search_parameters(f"nprobe={args.nprobe}")
    plain_ivf = faiss.clone_index(ivf.faiss_index)
    faiss.ParameterSpace().set_index_parameters(plain_ivf, f"nprobe={args.nprobe}")
    ours, plain = median_ratio(lambda: ivf.search(queries, K), lambda: plain_ivf.search(query_means, K), args.repeats)
    rows.append((f"IVF1024,Flat nprobe={args.nprobe}", ours, plain))

    print(f"gallery {N_ITEMS} x {DIM}, {N_QUERIES} queries (Prediction), k={K}, median of {args.repeats}, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads")
    print(f"{'index':<24} {'search+var (ms)':>16} {'plain faiss (ms)':>17} {'ratio':>7}")
    for name, ours, plain in rows:
        print(f"{name:<24} {ours * 1e3:>16.2f} {plain * 1e3:>17.2f} {ours / plain:>7.3f}")
    print(f"bytes per gallery item beside the FAISS index: {flat.extra_nbytes / len(flat):.0f} "
          f"(ids 8 + float16 variances {2 * DIM} + their scale 4 + variance sum 4)")


if __name__ == "__main__":
    main()
