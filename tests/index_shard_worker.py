"""One rank of the sharded-index tests (tests/test_index_sharding.py), launched by
``python -m torch.distributed.run --standalone --nproc-per-node 2``.

    index_shard_worker.py OUT

Runs every scenario of :data:`SCENARIOS` in sequence, on gloo (``LAM_DIST_BACKEND=nccl``:
on NCCL, rank r on ``cuda:r``, for benchmarks/gpu_check.sh on two GPUs or more): each rank trains its index
on its half of the training sample with ``across_ranks=True``, adds its half of the
gallery under its own ids, and calls ``gather``. The rank that gets the merged index
writes its search results to ``OUT/<name>.npz`` and saves it to ``OUT/<name>.safetensors``
(a no-op but on rank 0: only rank 0 writes files); every rank writes its trained-state
digests and what it got back to ``OUT/<name>.rank<r>.json``. Then the mismatches of
:data:`MISMATCHES` (and a merge made to fail on rank 0, whose index must come back as it was), each of which must raise on every rank: the message goes to
``OUT/<name>.rank<r>.err`` (a scenario that does not raise writes nothing: the test fails).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.distributed as dist

from lam_plugin import L2Normalize, LaplaceEmbedder
from lam_plugin.index import UncertainIndex, _sharding
from lam_plugin.index._merging import trained_state
from lam_plugin.prediction import Prediction

#: name: (UncertainIndex settings, dst of gather)
SCENARIOS: dict[str, tuple[dict[str, Any], int]] = {
    "ivfpq": ({"index_factory": "IVF8,PQ4x4", "variance_dtype": "3bit"}, 0),
    "ivf_dst1": ({"index_factory": "IVF8,Flat", "variance_dtype": "4bit"}, 1),
    "flat": ({"index_factory": "Flat", "variance_dtype": "float16"}, 0),
    "flat_dst1": ({"index_factory": "Flat", "variance_dtype": "float16", "metric": "ip"}, 1),
}
MISMATCHES = ("apart", "ids", "dtype", "too_few", "merge_fails")
DIM, N_SAMPLE, N_GALLERY, N_QUERIES, K = 16, 600, 1000, 25, 10


def prediction(n: int, seed: int) -> Prediction:
    """``n`` items of dimension :data:`DIM`: unit-norm means, std uniform in [0, 0.05]."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.nn.functional.normalize(torch.randn(n, DIM, generator=gen), dim=-1)
    return Prediction(mean=mean, std=0.05 * torch.rand(n, DIM, generator=gen))


def rows(pred: Prediction, part: slice) -> Prediction:
    return Prediction(mean=pred.mean[part], std=pred.std[part])


def sample() -> Prediction:
    return prediction(N_SAMPLE, 0)


def gallery() -> tuple[Prediction, np.ndarray]:
    """The gallery and its ids (distinct, not in order of position)."""
    return prediction(N_GALLERY, 1), 10**9 + 7 * np.arange(N_GALLERY, dtype=np.int64)[::-1].copy()


def queries() -> Prediction:
    return prediction(N_QUERIES, 2)


def half(rank: int, n: int) -> slice:
    """Rank ``rank``'s half (of two) of ``n`` items."""
    return slice(rank * n // 2, (rank + 1) * n // 2)


RESULTS = ("ids", "distances", "variances", "expected", "order_probabilities", "within_probabilities")


def results(index: UncertainIndex) -> dict[str, np.ndarray]:
    """What the tests compare of a search of :func:`queries`."""
    found = index.search(queries(), K, return_probabilities=True, threshold=1.0)
    return {name: getattr(found, name) for name in RESULTS}


def build(rank: int, out: Path, name: str, settings: dict[str, Any], dst: int) -> None:
    g, ids = gallery()
    index = UncertainIndex(progress=False, **settings)
    index.train(rows(sample(), half(rank, N_SAMPLE)), across_ranks=True)
    state = trained_state(index)
    index.add(rows(g, half(rank, N_GALLERY)), ids=ids[half(rank, N_GALLERY)])
    if "IVF" in settings.get("index_factory", ""):  # search parameters are not trained state
        index.set_search_parameters(f"nprobe={2 + rank}")
    merged = index.gather(dst=dst)
    if rank == dst:
        assert merged is index
        if "IVF" in settings.get("index_factory", ""):  # dst's nprobe, not rank 0's; then the test's
            assert faiss.extract_index_ivf(merged.faiss_index).nprobe == 2 + dst
            merged.set_search_parameters("nprobe=1")
        np.savez(out / f"{name}.npz", **results(merged))
        merged.save(out / f"{name}.safetensors")  # only rank 0 writes files: nothing for dst 1
    record = {"state": state, "got": None if merged is None else len(merged), "len": len(index)}
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(record))


def embedder_net() -> torch.nn.Module:
    """The small embedder of the ``posterior`` scenario (the same weights on every rank)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, DIM))
    return torch.nn.Sequential(net, L2Normalize())


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def fitting_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(4)]


#: The index settings of the ``posterior`` scenario; batches of 100 split the halves alike.
EMBEDDED = {"index_factory": "IVF8,Flat", "variance_dtype": "3bit", "batch_size": 100, "n_samples": 8}


def embedded(rank: int, out: Path) -> None:
    """The ``posterior`` scenario: the posterior fitted across the ranks (each on its half of
    the batches), then each rank embeds its half of the training sample and of the gallery
    through it (inputs, not predictions) and the shards are gathered on rank 0, which saves
    the posterior and writes the search results of the embedded queries."""
    batches = fitting_batches()
    posterior = LaplaceEmbedder(embedder_net(), progress=False).fit(batches[rank::2])
    _, ids = gallery()
    index = UncertainIndex(posterior, progress=False, **EMBEDDED)
    index.train(inputs(N_SAMPLE, 4)[half(rank, N_SAMPLE)], across_ranks=True)
    index.add(inputs(N_GALLERY, 5)[half(rank, N_GALLERY)], ids=ids[half(rank, N_GALLERY)])
    merged = index.gather()
    if merged is not None:
        posterior.save(out / "posterior.safetensors")
        found = merged.search(inputs(N_QUERIES, 6), K, return_probabilities=True, threshold=1.0)
        np.savez(out / "posterior.npz", **{name: getattr(found, name) for name in RESULTS})


def empty_shard(rank: int, out: Path) -> None:
    """Rank 1 trains with the others and adds nothing: the gathered index holds rank 0's
    items (written to ``OUT/empty_shard.json`` with their ids)."""
    g, ids = gallery()
    index = UncertainIndex(index_factory="IVF8,PQ4x4", variance_dtype="3bit", progress=False)
    index.train(rows(sample(), half(rank, N_SAMPLE)), across_ranks=True)
    if rank == 0:
        index.add(rows(g, half(0, N_GALLERY)), ids=ids[half(0, N_GALLERY)])
    merged = index.gather()
    if merged is not None:
        (out / "empty_shard.json").write_text(json.dumps({"ids": merged.ids.tolist(), "ntotal": merged.faiss_index.ntotal}))


def mismatch(rank: int, name: str) -> None:
    """Build shards that ``gather`` (or ``train``) must refuse on every rank."""
    g, ids = gallery()
    settings = {"index_factory": "IVF8,PQ4x4", "variance_dtype": "3bit", "progress": False}
    if name == "dtype":
        settings = {"variance_dtype": "float32" if rank else "float16", "progress": False}
    index = UncertainIndex(**settings)
    if name == "merge_fails":
        return merge_fails(rank, index)
    part = half(rank, N_SAMPLE)
    if name == "too_few":
        part = slice(part.start, part.start + 5)  # 10 items in all, PQ4x4 needs 16
    if name != "dtype":
        index.train(rows(sample(), part), across_ranks=name != "apart")
    index.add(rows(g, half(rank, N_GALLERY)), ids=ids[:500] if name == "ids" else ids[half(rank, N_GALLERY)])
    index.gather()


def merge_fails(rank: int, index: UncertainIndex) -> None:
    """Shards that pass every check, with a merge on rank 0 that fails (made to raise here):
    rank 0's index must come back as it was, and every rank must get the error."""
    g, ids = gallery()
    index.train(rows(sample(), half(rank, N_SAMPLE)), across_ranks=True)
    index.add(rows(g, half(rank, N_GALLERY)), ids=ids[half(rank, N_GALLERY)])
    before = results(index)

    def failing(target: UncertainIndex, other: UncertainIndex) -> None:
        raise RuntimeError("no memory left (made to fail)")

    original, _sharding.merge = _sharding.merge, failing
    try:
        index.gather()
    finally:
        _sharding.merge = original
        got = results(index)
        assert len(index) == N_GALLERY // 2
        assert all(np.array_equal(got[k], before[k], equal_nan=True) for k in before), "rank 0's index changed"


def main(out: Path) -> None:
    logging.basicConfig(level=logging.WARNING)
    backend = os.environ.get("LAM_DIST_BACKEND", "gloo")
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if backend == "nccl":  # the collectives move CUDA tensors, one device per rank
        torch.cuda.set_device(rank)
    for name, (settings, dst) in SCENARIOS.items():
        build(rank, out, name, settings, dst)
    embedded(rank, out)
    empty_shard(rank, out)
    for name in MISMATCHES:
        try:
            mismatch(rank, name)
        except ValueError as err:
            (out / f"{name}.rank{rank}.err").write_text(str(err))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
