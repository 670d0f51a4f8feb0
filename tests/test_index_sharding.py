"""Shards of one UncertainIndex: ``merge`` in one process, and ``train(across_ranks=True)``
with ``gather`` on 2 gloo ranks (one launch of tests/index_shard_worker.py for every
distributed scenario), against one process building the index from all the items."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from lam_plugin import EmbeddingPosterior
from lam_plugin.index import UncertainIndex
from lam_plugin.index._merging import trained_state

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from index_shard_worker import (  # noqa: E402
    EMBEDDED,
    N_GALLERY,
    N_QUERIES,
    N_SAMPLE,
    SCENARIOS,
    K,
    embedder_net,
    gallery,
    half,
    inputs,
    prediction,
    results,
    rows,
    sample,
)

FIELDS = ("ids", "distances", "variances", "expected", "order_probabilities", "within_probabilities")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one 2-rank run of every scenario of the worker."""
    out = tmp_path_factory.mktemp("shards")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*command, str(HERE / "index_shard_worker.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def one_process(settings: dict[str, Any]) -> UncertainIndex:
    """The index one process builds: trained on the whole sample, all of the gallery added."""
    g, ids = gallery()
    return UncertainIndex(progress=False, **settings).train(sample()).add(g, ids=ids)


def assert_same_results(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)  # exactly, NaN where NaN


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_gathered_shards_search_like_one_process_over_all_items(launched: Path, name: str) -> None:
    settings, dst = SCENARIOS[name]
    single = one_process(settings)
    want = results(single)
    with np.load(launched / f"{name}.npz") as got:
        assert_same_results(dict(got), want)
    records = [json.loads((launched / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    # every rank had the trained state one process gets from the whole sample in rank order
    assert records[0]["state"] == records[1]["state"] == trained_state(single)
    assert [r["got"] for r in records] == [N_GALLERY if r == dst else None for r in range(2)]
    assert [r["len"] for r in records] == [N_GALLERY if r == dst else N_GALLERY // 2 for r in range(2)]
    saved = launched / f"{name}.safetensors"
    assert saved.exists() == (dst == 0)  # only rank 0 writes files
    if dst == 0:
        reloaded = UncertainIndex.load(saved, progress=False)
        np.testing.assert_array_equal(reloaded.ids, single.ids)
        assert_same_results(results(reloaded), want)


def test_a_rank_that_adds_nothing_gathers_with_the_others(launched: Path) -> None:
    record = json.loads((launched / "empty_shard.json").read_text())
    assert record["ids"] == gallery()[1][half(0, N_GALLERY)].tolist() and record["ntotal"] == N_GALLERY // 2


def test_shards_embedded_through_a_posterior_fitted_across_ranks(launched: Path) -> None:
    """Each rank embeds its half of the sample and gallery with the same weight samples: the
    gathered index equals one process embedding all of it through the same posterior."""
    posterior = EmbeddingPosterior.load(launched / "posterior.safetensors", embedder_net())
    single = UncertainIndex(posterior, progress=False, **EMBEDDED).train(inputs(N_SAMPLE, 4))
    single.add(inputs(N_GALLERY, 5), ids=gallery()[1])
    found = single.search(inputs(N_QUERIES, 6), K, return_probabilities=True, threshold=1.0)
    with np.load(launched / "posterior.npz") as got:
        assert_same_results(dict(got), {name: getattr(found, name) for name in FIELDS})
    assert np.isfinite(found.variances).all() and (found.variances > 0).all()


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("apart", ["gather(): the ranks' trained indexes differ (faiss: rank 0 '", "variance bins: rank 0", "across_ranks=True"]),
        ("ids", ["gather(): 500 id(s) are held by more than one rank", "(ranks [0, 1])", "distinct ids="]),
        ("dtype", ["different configurations (variance_dtype: rank 0 'float16', rank 1 'float32')"]),
        ("too_few", ["train(across_ranks=True) failed on rank 0", "needs at least 16 vectors, got 10"]),
        ("merge_fails", ["merging the shards on rank 0 failed at rank 1's: no memory left (made to fail)"]),
    ],
)
def test_mismatched_shards_fail_on_every_rank_with_one_message(launched: Path, name: str, fragments: list[str]) -> None:
    messages = [(launched / f"{name}.rank{r}.err").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    for fragment in fragments:
        assert fragment in messages[0]


# ---------------------------------------------------------------- one process
def snapshot(index: UncertainIndex) -> tuple[int, np.ndarray, dict[str, np.ndarray] | None]:
    return len(index), index.ids, results(index) if len(index) >= 10 else None


def assert_unchanged(index: UncertainIndex, before: tuple[int, np.ndarray, dict[str, np.ndarray] | None]) -> None:
    after = snapshot(index)
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])
    if before[2] is not None:
        assert after[2] is not None
        assert_same_results(after[2], before[2])


def parts(settings: dict[str, Any], tmp_path: Path) -> tuple[UncertainIndex, UncertainIndex, UncertainIndex]:
    """Two shards of one trained index (trained here, and loaded from it saved empty),
    holding the two halves of the gallery, and one index adding the halves in turn."""
    g, ids = gallery()
    first, second = half(0, N_GALLERY), half(1, N_GALLERY)
    a = UncertainIndex(progress=False, **settings).train(sample())
    a.save(tmp_path / "trained.safetensors")
    b = UncertainIndex.load(tmp_path / "trained.safetensors", progress=False)
    a.add(rows(g, first), ids=ids[first])
    b.add(rows(g, second), ids=ids[second])
    whole = UncertainIndex.load(tmp_path / "trained.safetensors", progress=False)
    # the same batches: a PCA transform of one batch of 1000 rounds differently from two of 500
    whole.add(rows(g, first), ids=ids[first]).add(rows(g, second), ids=ids[second])
    return a, b, whole


@pytest.mark.parametrize(
    "settings",
    [
        {"index_factory": "IVF8,PQ4x4", "variance_dtype": "3bit"},
        {"index_factory": "Flat", "variance_dtype": "float16", "metric": "ip"},
        {"index_factory": "PCA8,IVF4,Flat", "variance_dtype": "float32"},
        {"index_factory": "SQ8", "variance_dtype": "4bit"},
    ],
)
def test_merge_appends_the_items_of_another_shard(settings: dict[str, Any], tmp_path: Path) -> None:
    a, b, whole = parts(settings, tmp_path)
    assert a.merge(b) is a
    np.testing.assert_array_equal(a.ids, whole.ids)
    assert a.faiss_index.ntotal == len(a) == N_GALLERY
    assert_same_results(results(a), results(whole))
    # the other index is left empty, still trained, and takes new items
    assert len(b) == b.faiss_index.ntotal == 0 and b.ids.size == 0 and b.extra_nbytes == 0
    b.add(prediction(20, 9), ids=np.arange(20))
    assert len(b) == b.faiss_index.ntotal == 20
    found = b.search(prediction(3, 8), 5).ids
    found = found[found >= 0]  # -1 in empty slots: IVF probes one list of 8
    assert found.size and set(found.tolist()) <= set(range(20))


def test_search_parameters_are_not_trained_state(tmp_path: Path) -> None:
    """Shards searched with other nprobe values merge; the trained-state digest is the same
    whether taken while the index was empty (at training) or from a full one (loaded)."""
    a, b, whole = parts({"index_factory": "IVF8,PQ4x4", "variance_dtype": "3bit"}, tmp_path)
    a.set_search_parameters("nprobe=3")
    whole.set_search_parameters("nprobe=3")
    a.save(tmp_path / "full.safetensors")
    loaded = UncertainIndex.load(tmp_path / "full.safetensors", progress=False)
    assert loaded._trained_digest is None  # not taken on load: it copies the whole index
    assert trained_state(loaded) == trained_state(a) == trained_state(b)
    a.merge(b)
    assert faiss.extract_index_ivf(a.faiss_index).nprobe == 3
    assert_same_results(results(a), results(whole))


def test_merge_after_remove(tmp_path: Path) -> None:
    """Removing renumbers the IVF labels to rows; a merge after it offsets the other's rows."""
    a, b, whole = parts({"index_factory": "IVF8,PQ4x4", "variance_dtype": "3bit"}, tmp_path)
    gone = np.concatenate([a.ids[::7], b.ids[3::5]])
    a.remove(a.ids[::7])
    b.remove(b.ids[3::5])
    whole.remove(gone)
    a.merge(b)
    np.testing.assert_array_equal(a.ids, whole.ids)
    assert_same_results(results(a), results(whole))


def refused(case: str, tmp_path: Path) -> tuple[UncertainIndex, UncertainIndex, str]:
    """Two indexes that ``merge`` must refuse, and a fragment of the message."""
    settings = {"index_factory": "IVF8,PQ4x4", "variance_dtype": "3bit"}
    a, b, _ = parts(settings, tmp_path)
    g, ids = gallery()
    if case == "metric":
        b = UncertainIndex(metric="ip", progress=False, **settings).train(sample()).add(rows(g, half(1, N_GALLERY)))
        return a, b, "different configurations (metric: this index 'l2', other 'ip')"
    if case == "variance_dtype":
        b = UncertainIndex(progress=False, index_factory="IVF8,PQ4x4", variance_dtype="4bit").train(sample())
        return a, b.add(rows(g, half(1, N_GALLERY))), "variance_dtype: this index '3bit', other '4bit'"
    if case == "trained":
        b = UncertainIndex(progress=False, **settings).train(prediction(N_SAMPLE, 5)).add(rows(g, half(1, N_GALLERY)))
        return a, b, "trained states differ (faiss: this index"
    if case == "bins":  # Flat needs no training, the variance bins do
        a = UncertainIndex(progress=False, variance_dtype="3bit").train(sample()).add(rows(g, half(0, N_GALLERY)))
        b = UncertainIndex(progress=False, variance_dtype="3bit").train(prediction(N_SAMPLE, 5))
        return a, b.add(rows(g, half(1, N_GALLERY))), "trained states differ (variance bins: this index"
    if case == "ids":
        b = UncertainIndex.load(tmp_path / "trained.safetensors", progress=False).add(rows(g, slice(490, 510)), ids=ids[490:510])
        return a, b, "ids already in the index: [" + ", ".join(map(str, ids[490:500])) + "]"
    if case == "hnsw":
        a = UncertainIndex(progress=False, index_factory="HNSW8").add(rows(g, half(0, N_GALLERY)))
        b = UncertainIndex(progress=False, index_factory="HNSW8").add(rows(g, half(1, N_GALLERY)), ids=ids[:500])
        return a, b, "faiss cannot merge 'HNSW8' indexes (IndexHNSWFlat); merging works for Flat, PQ, SQ"
    if case == "fast scan":  # FAISS reconstructs wrongly from merged fast-scan lists
        fast = {"index_factory": "IVF8,PQ4x4fs", "progress": False}
        a = UncertainIndex(**fast).train(sample()).add(rows(g, half(0, N_GALLERY)))
        b = UncertainIndex(**fast).train(sample()).add(rows(g, half(1, N_GALLERY)), ids=ids[:500])
        return a, b, "faiss cannot merge 'IVF8,PQ4x4fs' indexes (IndexIVFPQFastScan)"
    if case == "untrained":
        return UncertainIndex(progress=False, **settings), b, "cannot merge into an index that is not trained"
    return a, a, "cannot merge an index into itself"


@pytest.mark.parametrize(
    "case", ["metric", "variance_dtype", "trained", "bins", "ids", "hnsw", "fast scan", "untrained", "itself"]
)
def test_refused_merges_change_neither_index(case: str, tmp_path: Path) -> None:
    a, b, fragment = refused(case, tmp_path)
    before = snapshot(a), snapshot(b)
    with pytest.raises(ValueError) as err:
        a.merge(b)
    assert fragment in str(err.value)
    assert_unchanged(a, before[0])
    assert_unchanged(b, before[1])


@pytest.mark.parametrize("variance_dtype", ["3bit", "float16", "float32"])
def test_merging_an_index_that_holds_nothing_changes_nothing(tmp_path: Path, variance_dtype: str) -> None:
    settings = {"index_factory": "IVF8,PQ4x4", "variance_dtype": variance_dtype}
    a, _, _ = parts(settings, tmp_path)
    before = snapshot(a)
    a.merge(UncertainIndex(progress=False, **settings))  # not trained
    assert_unchanged(a, before)
    a.merge(UncertainIndex.load(tmp_path / "trained.safetensors", progress=False))  # trained, empty
    assert_unchanged(a, before)
    empty = UncertainIndex.load(tmp_path / "trained.safetensors", progress=False)
    empty.merge(a)  # into a trained, empty one
    assert_unchanged(empty, before)
    with pytest.raises(ValueError, match="index_factory: this index 'IVF8,PQ4x4', other 'Flat'"):
        a.merge(UncertainIndex(progress=False, variance_dtype="3bit"))
    with pytest.raises(TypeError, match="other must be an UncertainIndex"):
        a.merge("index")  # type: ignore[arg-type]


def test_outside_a_process_group_across_ranks_is_a_plain_train_and_gather_returns_self() -> None:
    settings = {"index_factory": "IVF8,PQ4x4", "variance_dtype": "3bit"}
    plain = UncertainIndex(progress=False, **settings).train(sample())
    index = UncertainIndex(progress=False, **settings).train(sample(), across_ranks=True)
    assert trained_state(index) == trained_state(plain)
    assert index.gather() is index
