"""UncertainIndex at scale: streamed adds, compact variances, search cost.

A gallery of ``--n`` random unit means of dimension ``--dim`` with per-dimension std
drawn uniformly in [0, 0.05], precomputed, is streamed to ``UncertainIndex.add`` from a
loader of ``--batch`` items through a stand-in posterior whose ``predict`` hands back
the moments a batch carries (``x`` ``[B, 2, D]``: mean and std), so what is timed is the
index, not a network. The index is trained first (``train`` on the first ``train_size``
items, the default rule of ``UncertainIndex``) and timed apart. Measured in one run:

* bytes per item held beside FAISS (ids, variances stored as ``--variance-dtype``, their
  scales and sums), with FAISS's own bytes per item (its serialised size) for scale;
* add: the gallery in ``--parts`` equal parts, each streamed by ``add(loader)`` into the
  index and, alternately, given to FAISS's own ``add`` on clones of the same trained
  FAISS index, in one call and in the loader's batches, and run through the loader and
  the posterior alone (the "forward passes": here contiguous copies of the moments, as
  a network's outputs are), and through the plain FAISS pipeline (each batch's
  forward pass, then FAISS's add of its means: the work the target counts, with the
  slow-down FAISS's threads suffer right after torch's): items/s of each (median over
  the parts) and the median ratios of the times;
* memory: the resident size after each part minus what the four FAISS indexes and the
  stored items hold: flat when ``add`` streams;
* search: ``--queries`` queries (``Prediction``s), k = ``--k``, the median over
  ``--repeats`` of ``search`` with variances against a plain FAISS search of the query
  means on that clone (the same vectors), both at ``--nprobe``, and their ratio.

Run: ``python benchmarks/index_scale.py --n 1000000 --dim 128 --factory IVF1024,PQ16 --nprobe 16``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator

import faiss
import numpy as np
import torch

from lam_plugin.index import UncertainIndex
from lam_plugin.index.faiss_backend import training_size
from lam_plugin.prediction import Prediction


class MomentsPosterior:
    """Stands in for a posterior: a batch ``[B, 2, D]`` carries the mean and std of each item."""

    fingerprint = "precomputed moments"

    def predict(self, x: torch.Tensor, n: int = 30, generator: object = None, return_samples: bool = False) -> Prediction:
        return Prediction(mean=x[:, 0].contiguous(), std=x[:, 1].contiguous())


def random_moments(n: int, dim: int, seed: int) -> np.ndarray:
    """``[n, 2, dim]`` float32: unit-norm Gaussian means and std uniform in [0, 0.05]."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 2, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: no float64 copy of the whole gallery
        stop = min(n, start + 100_000)
        mean = rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop, 0] = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        out[start:stop, 1] = rng.uniform(0.0, 0.05, size=(stop - start, dim)).astype(np.float32)
    return out


def loader(moments: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
    """Batches of ``batch`` items of ``moments`` (views, no copies)."""
    for start in range(0, len(moments), batch):
        yield torch.from_numpy(moments[start : start + batch])


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def faiss_bytes(index: faiss.Index) -> int:
    """What ``index`` holds per item: an IVF index's inverted lists (codes and ids), else its codes."""
    try:
        invlists = faiss.extract_index_ivf(index).invlists
    except RuntimeError:
        return index.ntotal * index.sa_code_size()
    return sum(invlists.list_size(i) * (invlists.code_size + 8) for i in range(invlists.nlist))


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_adds(index: UncertainIndex, plain: faiss.Index, moments: np.ndarray, args: argparse.Namespace) -> list[dict[str, float]]:
    """Per part of the gallery, the seconds of: ``ours`` (``add(loader)``), FAISS's add
    of the means in ``one call`` and in the loader's ``batches``, the ``forward`` passes
    alone, and the ``pipeline`` of plain FAISS (each batch through the posterior, then its
    means added), each timed in turn: ``one call`` into ``plain`` (searched later), the
    others into clones of the trained ``plain`` dropped after."""
    times = []
    clones = {name: faiss.clone_index(plain) for name in ("batches", "pipeline")} | {"one call": plain}
    posterior = index.posterior
    for part in np.array_split(moments, args.parts):
        means = np.ascontiguousarray(part[:, 0])
        chunks = np.array_split(means, -(-len(means) // args.batch))
        times.append({
            "items": len(part),
            "ours": seconds(lambda part=part: index.add(loader(part, args.batch))),
            "one call": seconds(lambda means=means: clones["one call"].add(means)),
            "batches": seconds(lambda chunks=chunks: [clones["batches"].add(c) for c in chunks]),
            "forward": seconds(lambda part=part: [posterior.predict(x) for x in loader(part, args.batch)]),
            "pipeline": seconds(lambda part=part: [clones["pipeline"].add(posterior.predict(x).mean.numpy()) for x in loader(part, args.batch)]),
            "rss": resident_bytes(),
            "held": index.extra_nbytes + sum(faiss_bytes(ix) for ix in (index.faiss_index, *clones.values())),
        })
    return times


def measure_search(
    index: UncertainIndex, plain: faiss.Index, queries: Prediction, args: argparse.Namespace
) -> tuple[float, float, float]:
    """Median seconds of ``search`` with variances and of plain FAISS, timed alternately after a warm-up."""
    q = queries.mean.numpy()
    ours_fn, plain_fn = (lambda: index.search(queries, args.k)), (lambda: plain.search(q, args.k))
    same = (ours_fn().ids == plain_fn()[1]).mean()
    t_ours, t_plain = [], []
    for _ in range(args.repeats):
        t_ours.append(seconds(ours_fn))
        t_plain.append(seconds(plain_fn))
    return statistics.median(t_ours), statistics.median(t_plain), float(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--factory", default="IVF1024,PQ16")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--batch", type=int, default=10_000, help="items per loader batch")
    parser.add_argument("--parts", type=int, default=10, help="gallery parts: the repeats of the add timing")
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variance-dtype", default="3bit", help="UncertainIndex(variance_dtype=...)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    start = time.perf_counter()
    moments = random_moments(args.n, args.dim, seed=0)
    queries_rows = torch.from_numpy(random_moments(args.queries, args.dim, seed=1))
    queries = Prediction(mean=queries_rows[:, 0], std=queries_rows[:, 1])
    index = UncertainIndex(MomentsPosterior(), index_factory=args.factory, variance_dtype=args.variance_dtype, progress=False)
    train_size = min(args.n, training_size(args.factory, args.dim, "l2") or 1)  # 1: needs no training
    t_train = seconds(lambda: index.train(loader(moments[:train_size], args.batch)))
    plain = faiss.clone_index(index.faiss_index)  # the same trained, empty index
    adds = measure_adds(index, plain, moments, args)
    if "IVF" in args.factory:
        index.set_search_parameters(f"nprobe={args.nprobe}")
        faiss.ParameterSpace().set_index_parameters(plain, f"nprobe={args.nprobe}")
    t_ours, t_plain, same = measure_search(index, plain, queries, args)

    print(f"{args.n} items x {args.dim}, {args.factory}, nprobe={args.nprobe}, loader batches of {args.batch}; "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; {time.perf_counter() - start:.0f} s in all")
    print(f"training on {train_size} items: {t_train:.1f} s")
    print(f"bytes per item beside FAISS, variances as {args.variance_dtype}: {index.extra_nbytes / len(index):.1f} "
          f"(float32 variances would take {4 * args.dim + 12}); FAISS's own: "
          f"{faiss.serialize_index(index.faiss_index).nbytes / len(index):.1f}")
    rates = {name: statistics.median(t["items"] / t[name] for t in adds) for name in ("ours", "one call", "batches", "forward", "pipeline")}
    print(f"add, items/s, median of {len(adds)} parts of {adds[0]['items']}: "
          + ", ".join(f"{name} {rate:,.0f}" for name, rate in rates.items()))
    for name in ("one call", "batches", "batches + forward", "pipeline"):
        ratios = [t["ours"] / sum(t[term] for term in name.split(" + ")) for t in adds]
        print(f"  time of add(loader) / {name}: median {statistics.median(ratios):.3f} "
              f"(parts: {', '.join(f'{r:.3f}' for r in ratios)})")
    growth = [(t["rss"] - t["held"]) / 2**20 for t in adds]
    print(f"  memory: resident minus what the indexes hold (the 4 FAISS indexes' lists, the stored items), MiB, "
          f"after each part: {', '.join(f'{g:.0f}' for g in growth)}")
    print(f"search of {args.queries} queries, k={args.k} (median of {args.repeats}): with variances {t_ours * 1e3:.2f} ms, "
          f"plain FAISS {t_plain * 1e3:.2f} ms, ratio {t_ours / t_plain:.3f}; same ids {same:.4f}")


if __name__ == "__main__":
    main()
