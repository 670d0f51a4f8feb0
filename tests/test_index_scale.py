"""Tests of UncertainIndex at scale, at small sizes: streamed adds and training, compact
variances, removal, refused inputs and the file format of these."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin.index import FORMAT_VERSION, UncertainIndex, storage
from lam_plugin.index._merging import trained_state
from lam_plugin.index.faiss_backend import training_size
from lam_plugin.index.items import ItemStore, to_float16
from lam_plugin.index.rows import GrowingRows, SortedIds
from lam_plugin.prediction import Prediction

DIM = 16


class RowsPosterior:
    """A posterior that hands back precomputed moments: an input ``[B, 2, D]`` holds the
    mean and the std of each item (the benchmark's way to stream a large gallery)."""

    fingerprint = "rows"

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, x, n: int = 30, generator=None, return_samples: bool = False) -> Prediction:
        self.calls += 1
        return Prediction(mean=x[:, 0], std=x[:, 1])


def moments(n: int, seed: int, dim: int = DIM, spread: bool = False) -> torch.Tensor:
    """``[n, 2, dim]`` unit-norm means and stds; ``spread``: stds over six orders of
    magnitude within an item, and some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    std = 0.05 * torch.rand(n, dim, generator=gen)
    if spread:
        std = 10.0 ** (-6 * torch.rand(n, dim, generator=gen)) * 0.1
        std[torch.rand(n, dim, generator=gen) < 0.05] = 0.0
    return torch.stack([mean, std], dim=1)


def prediction(rows: torch.Tensor) -> Prediction:
    return Prediction(mean=rows[:, 0], std=rows[:, 1])


def watched(batches: torch.Tensor, size: int, index: UncertainIndex, seen: list[int]):
    """Batches of ``size`` rows; before each, the number of items the index holds."""
    for start in range(0, len(batches), size):
        seen.append(len(index))
        yield batches[start : start + size]


def test_stream_adds_batch_by_batch_and_trains_on_a_bounded_buffer() -> None:
    gallery, queries = moments(3000, 0), prediction(moments(40, 1))
    seen: list[int] = []
    index = UncertainIndex(RowsPosterior(), index_factory="IVF16,Flat", train_size=1000, progress=False)
    index.add(watched(gallery, 250, index, seen))
    # 4 batches buffered, trained at 1000 items, then one batch at a time
    assert seen == [0, 0, 0, 0, *range(1000, 3000, 250)]
    assert len(index) == 3000 and index.faiss_index.ntotal == 3000
    explicit = UncertainIndex(RowsPosterior(), index_factory="IVF16,Flat", progress=False).train(gallery[:1000])
    assert len(explicit) == 0 and explicit.faiss_index.is_trained
    seen.clear()
    explicit.add(watched(gallery, 250, explicit, seen))
    assert seen == list(range(0, 3000, 250))  # trained: no buffering
    seen.clear()
    flat = UncertainIndex(RowsPosterior(), train_size=500, progress=False)
    flat.add(watched(gallery[:1000], 250, flat, seen))
    assert seen == [0, 250, 500, 750]  # needs no training: no buffering
    for ix in (index, explicit):
        ix.set_search_parameters("nprobe=16")
    a, b = index.search(queries, 5), explicit.search(queries, 5)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.variances, b.variances)
    exact = UncertainIndex(progress=False).add(prediction(gallery)).search(queries, 5)
    np.testing.assert_array_equal(a.ids, exact.ids)  # every list probed: exact


def test_default_training_size_rule() -> None:
    assert training_size("IVF1024,PQ16", 128, "l2") == 40 * 1024
    assert training_size("IVF16,Flat", 8, "l2") == 10_000
    assert training_size("HNSW32,PQ8", 64, "ip") == 40 * 256  # the PQ of the HNSW storage
    assert training_size("IVF512,PQ8x10", 64, "l2") == 40 * 1024  # 2^10 centroids per sub-quantiser
    assert training_size("Flat", 8, "l2") is None and training_size("HNSW32", 8, "l2") is None


def test_too_few_training_items_fail_and_lose_nothing() -> None:
    small, enough = moments(50, 2), moments(600, 3)
    index = UncertainIndex(RowsPosterior(), index_factory="IVF64,Flat", progress=False)
    with pytest.raises(ValueError, match="at least 64 vectors, got 50"):
        index.add(iter([small[:30], small[30:]]))
    with pytest.raises(ValueError, match="at least 64 vectors, got 50"):
        index.train(small)
    assert len(index) == 0 and index.faiss_index is None
    capped = UncertainIndex(RowsPosterior(), index_factory="IVF64,Flat", train_size=40, progress=False)
    with pytest.raises(ValueError, match="at least 64 vectors, got 40"):
        capped.add(enough)
    assert len(capped) == 0
    index.add(enough, ids=np.arange(600) + 10)
    with pytest.raises(ValueError, match="trained already .* 600 items"):
        index.train(enough)
    assert len(index) == 600 and index.faiss_index.ntotal == 600
    np.testing.assert_array_equal(index.ids, np.arange(600) + 10)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_float16_variances_stay_within_the_documented_bound(metric: str) -> None:
    gallery, queries = prediction(moments(2000, 4, spread=True)), prediction(moments(50, 5, spread=True))
    results = {
        dtype: UncertainIndex(metric=metric, variance_dtype=dtype, progress=False)
        .add(gallery)
        .search(queries, 20, return_probabilities=True)
        for dtype in ("float16", "float32")
    }
    half, full = results["float16"], results["float32"]
    np.testing.assert_array_equal(half.ids, full.ids)
    np.testing.assert_array_equal(half.expected, full.expected)  # the variance sums are kept exactly
    rel = np.abs(half.variances.astype(np.float64) / full.variances - 1)
    assert rel.max() <= (1e-3 if metric == "l2" else 5e-4), rel.max()
    assert rel.mean() < 2e-4
    np.testing.assert_allclose(half.order_probabilities, full.order_probabilities, atol=1e-3)


def test_stored_variances_decode_within_the_bound_and_take_half_the_bytes() -> None:
    var = (moments(500, 6, dim=128, spread=True)[:, 1] ** 2).numpy()
    var[:3] = 0.0  # items without noise
    stores = {dtype: ItemStore("closed_form", dtype, 2) for dtype in ("float16", "float32")}
    for store in stores.values():
        store.append(np.arange(500), var, None)
    rows = np.arange(500)
    decoded = stores["float16"].variances(rows)
    u = 2.0**-11 + 2.0**-22
    assert (np.abs(decoded.astype(np.float64) - var) <= u * var + 2.0**-40 * var.max(axis=1, keepdims=True)).all()
    np.testing.assert_array_equal(decoded.max(axis=1), var.max(axis=1))  # the largest exactly
    np.testing.assert_array_equal(stores["float32"].variances(rows), var)
    assert stores["float16"].nbytes == 500 * (2 * 128 + 16) and stores["float32"].nbytes == 500 * (4 * 128 + 12)


def test_float16_rounding_equals_numpys_cast() -> None:
    # random mantissas, and at every bit j the ties (bit j set, those below clear) and their neighbours
    rng = np.random.default_rng(0)
    ties = [(k << (j + 1)) | (1 << j) + d for j in range(23) for k in (0, 1, 2, 3, (1 << (22 - j)) - 1) for d in (-1, 0, 1)]
    mantissas = np.concatenate([rng.integers(0, 2**23, 50_000), ties]).astype(np.uint32) & np.uint32(2**23 - 1)
    for exponent in range(-30, 15):  # from float16 subnormal codes (and below) to 2^15
        t = ((np.uint32(exponent + 127) << 23) | mantissas).view(np.float32)
        np.testing.assert_array_equal(to_float16(t).view(np.uint16), t.astype(np.float16).view(np.uint16))
    edges = np.array([0.0, 2.0**-25, 2.0**-24, 2.0**-14, 32768.0, 32784.0, 65504.0], dtype=np.float32)
    np.testing.assert_array_equal(to_float16(edges).view(np.uint16), edges.astype(np.float16).view(np.uint16))


# PQ without its polysemous training ("np"), 4-bit codes: 100 times faster to train here
@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,PQ4x4np", "PQ4x4np", "PCA8,IVF16,Flat", "SQ8"])
def test_removed_items_are_never_returned(factory: str) -> None:
    rows, queries, extra = moments(2000, 7), prediction(moments(30, 8)), prediction(moments(10, 9))
    ids = np.arange(2000) * 3 + 5
    gone = np.random.default_rng(0).choice(ids, 600, replace=False)
    left = ~np.isin(ids, gone)
    index = UncertainIndex(index_factory=factory, train_size=2000, progress=False).add(prediction(rows), ids=ids)
    index.remove(torch.from_numpy(gone))
    assert len(index) == 1400 and index.faiss_index.ntotal == 1400
    np.testing.assert_array_equal(index.ids, ids[left])
    # the same as an index of the items left, trained on the same items, before and after more adds
    fresh = UncertainIndex(index_factory=factory, progress=False).train(prediction(rows))
    fresh.add(prediction(rows[left]), ids=ids[left])
    for ix in (index, fresh):
        if "IVF" in factory:
            ix.set_search_parameters("nprobe=16")
    for step in ("removed", "added again"):
        result, expected = index.search(queries, 50), fresh.search(queries, 50)
        np.testing.assert_array_equal(result.ids, expected.ids, err_msg=step)
        np.testing.assert_allclose(result.variances, expected.variances, rtol=1e-5, err_msg=step)
        assert not np.isin(result.ids, gone[10:]).any()
        index.add(extra, ids=gone[:10])  # removed ids may come back
        fresh.add(extra, ids=gone[:10])
        gone = gone[10:]
    if factory in ("Flat", "IVF16,Flat"):  # the items left find themselves
        again = index.search(prediction(rows[left][:20]), 1)
        np.testing.assert_array_equal(again.ids[:, 0], ids[left][:20])


def test_remove_refreshes_the_gpu_copy(monkeypatch) -> None:
    """The wiring of removal with ``device="cuda"`` and no GPU: faiss's GPU calls are
    replaced by stand-ins that copy the CPU index (as tests/test_index.py does for adds)."""
    copies: list = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, gpu, ix: copies.append(faiss.clone_index(ix)) or copies[-1], raising=False)
    gallery = prediction(moments(300, 33))
    index = UncertainIndex(device="cuda", index_factory="IVF4,Flat", progress=False).add(gallery)
    index.remove(np.arange(100))
    assert [copy.ntotal for copy in copies] == [300, 200]
    assert not np.isin(index.search(gallery, 3).ids, np.arange(100)).any()  # searched on the copy


def test_remove_refuses_unknown_ids_and_hnsw_and_changes_nothing(tmp_path) -> None:
    gallery, queries = prediction(moments(300, 10)), prediction(moments(20, 11))
    index = UncertainIndex(progress=False).add(gallery, ids=np.arange(300) + 100)
    before = index.search(queries, 5, return_probabilities=True)
    for ids, match in (([105, 7, 8], r"ids not in the index: \[7, 8\]"), ([105, 105], "duplicates"), ([1.5], "integers")):
        with pytest.raises(ValueError, match=match):
            index.remove(ids)
    hnsw = UncertainIndex(index_factory="HNSW16", progress=False).add(gallery)
    with pytest.raises(ValueError, match="cannot remove items from a 'HNSW16' index"):
        hnsw.remove([0])
    assert len(hnsw) == 300 and hnsw.faiss_index.ntotal == 300
    assert len(index) == 300
    after = index.search(queries, 5, return_probabilities=True)
    for name in ("ids", "variances", "order_probabilities"):
        np.testing.assert_array_equal(getattr(before, name), getattr(after, name))
    nearest = np.unique(before.ids[:, 0])
    index.remove([]).remove(nearest)
    assert len(index) == 300 - nearest.size and not np.isin(index.search(queries, 5).ids, nearest).any()
    index.save(tmp_path / "removed.safetensors")
    loaded = UncertainIndex.load(tmp_path / "removed.safetensors")
    np.testing.assert_array_equal(loaded.search(queries, 5).variances, index.search(queries, 5).variances)
    index.remove(index.ids)
    assert len(index) == 0
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(queries, 1)
    index.add(gallery)  # default ids start again at 0
    np.testing.assert_array_equal(index.ids, np.arange(300))


def test_monte_carlo_items_are_removed_with_their_samples() -> None:
    gen = torch.Generator().manual_seed(12)
    samples = torch.nn.functional.normalize(torch.randn(8, 100, DIM, generator=gen), dim=-1)
    gallery = Prediction.from_samples(samples, keep_samples=True)
    index = UncertainIndex(variance="mc", n_samples=8, progress=False).add(gallery)
    index.remove(np.arange(0, 100, 2))
    result = index.search(Prediction(gallery.mean[1::2], gallery.std[1::2], samples[:, 1::2]), 1)
    np.testing.assert_array_equal(result.ids[:, 0], np.arange(1, 100, 2))
    np.testing.assert_allclose(result.variances[:, 0], 0, atol=1e-10)  # each finds its own samples
    assert index.extra_nbytes == 50 * (8 + 8 * DIM * 4)


def test_wrong_dimension_or_dtype_keeps_what_is_stored() -> None:
    gallery, queries = moments(200, 13), prediction(moments(10, 14))
    index = UncertainIndex(RowsPosterior(), progress=False).add(gallery)
    before = index.search(queries, 5)
    bad = [
        (Prediction(torch.ones(4, DIM, dtype=torch.int64), torch.zeros(4, DIM)), "data.mean must be a floating-point"),
        (Prediction(gallery[:4, 0], torch.zeros(4, DIM, dtype=torch.bool)), "data.std must be a floating-point"),
        (Prediction(gallery[:4, 0].numpy().astype(complex), gallery[:4, 1]), "data.mean must be a floating-point"),
        (prediction(moments(4, 15, dim=DIM + 1)), "data has dimension 17, the index has dimension 16"),
        (torch.ones(4, 2, DIM, dtype=torch.int32), "data.mean must be a floating-point"),
    ]
    for data, match in bad:
        with pytest.raises(ValueError, match=match):
            index.add(data)
    assert len(index) == 200
    after = index.search(queries, 5)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.variances, before.variances)
    for data, match in (
        (iter([moments(4, 16), moments(4, 17, dim=8)]), "data has dimension 8, the index has dimension 16"),
        (iter([moments(4, 18), torch.zeros(0, 2, DIM)]), r"data.mean must have shape \[B, D\]"),
    ):
        with pytest.raises(ValueError, match=match):
            index.add(data)
    np.testing.assert_array_equal(index.ids, np.arange(208))  # the good first batch of each loader
    index.add(Prediction(gallery[:4, 0].double(), gallery[:4, 1].half()))  # other float types are converted
    assert len(index) == 212
    untrained = UncertainIndex(RowsPosterior(), index_factory="IVF4,Flat", progress=False)
    with pytest.raises(ValueError, match="data has dimension 8, the items before have 16"):
        untrained.add(iter([moments(40, 19), moments(40, 20, dim=8)]))
    assert len(untrained) == 0 and untrained.faiss_index is None


def test_ids_are_checked_against_the_stored_ones_in_every_order() -> None:
    index = UncertainIndex(RowsPosterior(), progress=False).add(moments(100, 21), ids=np.arange(100) * 2)
    index.add(moments(50, 22), ids=np.arange(50) * 2 + 1)  # below the largest: looked up
    with pytest.raises(ValueError, match=r"ids already in the index: \[7\]"):
        index.add(iter([moments(2, 23), moments(2, 24)]), ids=[1001, 1003, 1005, 7])
    assert len(index) == 150  # refused before anything was embedded
    index.add(moments(3, 25), ids=[1000, 101, 5000])
    with pytest.raises(ValueError, match=r"already in the index: \[5000\]"):
        index.add(moments(1, 26), ids=[5000])
    with pytest.raises(ValueError, match="ids has 3 entries, data has more items"):
        index.add(iter([moments(2, 27), moments(2, 28)]), ids=[6000, 6001, 6002])
    with pytest.raises(ValueError, match="ids has 3 entries, data has 2 items"):
        index.add(iter([moments(2, 29)]), ids=[7000, 7001, 7002])
    # a streamed add keeps the batches before the one that failed
    np.testing.assert_array_equal(index.ids[-4:], [6000, 6001, 7000, 7001])


def test_save_load_keeps_the_compact_layout_and_refuses_version_1(tmp_path) -> None:
    gallery, queries = prediction(moments(300, 29)), prediction(moments(10, 30))
    for dtype in ("float16", "float32"):
        index = UncertainIndex(variance_dtype=dtype, index_factory="IVF4,Flat", train_size=100, progress=False)
        index.add(gallery)
        path = tmp_path / f"{dtype}.safetensors"
        index.save(path)
        loaded = UncertainIndex.load(path)
        assert (loaded.variance_dtype, loaded.train_size) == (dtype, 100)
        np.testing.assert_array_equal(loaded.search(queries, 5).variances, index.search(queries, 5).variances)
        with safe_open(str(path), framework="np") as f:
            meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
        assert tensors["var"].dtype == np.dtype(dtype) and ("var_scale" in tensors) == (dtype == "float16")
        loaded.remove([0, 1]).add(prediction(moments(2, 31)))  # a loaded index grows and shrinks
        assert len(loaded) == 300
    trained = UncertainIndex(index_factory="IVF4,Flat", progress=False).train(gallery)  # trained, no items
    trained.save(tmp_path / "trained.safetensors")
    reloaded = UncertainIndex.load(tmp_path / "trained.safetensors")
    assert len(reloaded) == 0 and reloaded.dim == DIM and reloaded.faiss_index.is_trained
    reloaded.add(gallery)
    trained.add(gallery)
    np.testing.assert_array_equal(reloaded.search(queries, 5).variances, trained.search(queries, 5).variances)
    assert FORMAT_VERSION == 2
    old = tmp_path / "version1.safetensors"
    save_file({"ids": tensors["ids"], "var": tensors["var"]}, str(old), metadata={**meta, "format_version": "1"})
    with pytest.raises(ValueError, match="format version '1'; this lam-plugin .* reads version 2 only"):
        UncertainIndex.load(old)
    broken = tmp_path / "broken.safetensors"  # a well-formed file of the float32 index without its sums
    storage.write(broken, {k: v for k, v in tensors.items() if k != "var_sum"}, json.loads(meta["config"]), None)
    with pytest.raises(ValueError, match=r"inconsistent: var_sum should be float32 \(300,\), found missing"):
        UncertainIndex.load(broken)


def test_growing_rows_and_sorted_ids() -> None:
    rows = GrowingRows(np.empty((0, 3), dtype=np.float32))
    buffers = set()
    for k in range(1000):
        rows.append(np.full((10, 3), k, dtype=np.float32))
        buffers.add(id(rows._buf))
    assert rows.view.shape == (10_000, 3) and len(buffers) <= 8  # doubling: log2(10,000 / 256) + 1 copies
    np.testing.assert_array_equal(rows.view[::10, 0], np.arange(1000))
    np.testing.assert_array_equal(rows.delete(np.arange(0, 10_000, 2))[:, 0], np.repeat(np.arange(1000), 5))
    rng = np.random.default_rng(0)
    ids, sorted_ids = set(), SortedIds(np.empty(0, dtype=np.int64))
    for _ in range(50):
        new = np.setdiff1d(rng.integers(0, 10**12, rng.integers(1, 40)), list(ids))
        sorted_ids.add(new)
        ids.update(new.tolist())
        probe = np.concatenate([new[:3], rng.integers(0, 10**12, 5), list(ids)[:3]])
        np.testing.assert_array_equal(sorted_ids.contains(probe), [p in ids for p in probe])
    assert len(sorted_ids._runs) <= 12


def test_faiss_sees_the_same_vectors_as_a_plain_add() -> None:
    gallery = moments(1000, 32)
    index = UncertainIndex(RowsPosterior(), index_factory="IVF8,PQ4x4np", train_size=1000, progress=False)
    index.add(iter(gallery.split(128)))
    plain = faiss.clone_index(index.faiss_index)
    plain.reset()
    plain.add(gallery[:, 0].numpy())
    assert faiss.serialize_index(plain).tobytes() == faiss.serialize_index(index.faiss_index).tobytes()


def test_a_sorted_gallery_trains_on_a_random_draw_not_its_first_items() -> None:
    """A DataLoader over a gallery sorted by cluster (an image folder, class by class):
    the first add trains the IVF lists on ``train_size`` items drawn at random with the
    index's seed, not on its first cluster, and still adds every item once, in order."""
    gen = torch.Generator().manual_seed(40)
    centres = torch.nn.functional.normalize(torch.randn(8, DIM, generator=gen), dim=-1)
    mean = torch.nn.functional.normalize(centres.repeat_interleave(400, 0) + 0.1 * torch.randn(3200, DIM, generator=gen), dim=-1)
    rows = torch.stack([mean, 0.05 * torch.rand(3200, DIM, generator=gen)], dim=1)
    settings = dict(index_factory="IVF8,Flat", train_size=400, progress=False)
    drawn = UncertainIndex(RowsPosterior(), **settings).add(DataLoader(TensorDataset(rows), batch_size=200))
    picked = np.sort(np.random.default_rng(0).choice(3200, 400, replace=False))
    by_hand = UncertainIndex(RowsPosterior(), **settings).train(rows[torch.from_numpy(picked)])
    assert trained_state(drawn)["faiss"] == trained_state(by_hand)["faiss"]  # trained on exactly that draw
    np.testing.assert_array_equal(drawn.ids, np.arange(3200))
    first = UncertainIndex(RowsPosterior(), **settings).add(iter(rows.split(200)))  # an iterator: its first 400
    exact = UncertainIndex(progress=False).add(prediction(rows))
    queries = prediction(torch.stack([centres, torch.zeros_like(centres)], dim=1))
    truth = exact.search(queries, 10).ids
    recall = {}
    for name, index in (("drawn", drawn), ("first", first)):
        index.set_search_parameters("nprobe=1")
        recall[name] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(index.search(queries, 10).ids, truth)])
    # lists trained on the first cluster alone split the others badly: measured 0.99 against 0.85
    assert recall["drawn"] >= 0.95 and recall["first"] <= recall["drawn"] - 0.1, recall


def test_a_loader_that_yields_part_of_its_dataset_trains_on_its_first_items() -> None:
    """A draw from the dataset is a draw from what is added only under the default samplers
    over all of it; a loader with its own sampler (a part of the dataset, as a distributed
    sampler gives) or dropping its last batch trains on its first items, as an iterator."""
    rows = torch.stack([torch.randn(3200, DIM), 0.05 * torch.rand(3200, DIM)], dim=1)
    dataset = TensorDataset(rows)
    settings = dict(index_factory="IVF8,Flat", train_size=400, progress=False)

    def trained_on(loader: DataLoader) -> str:
        return trained_state(UncertainIndex(RowsPosterior(), **settings).add(loader))["faiss"]

    picked = torch.from_numpy(np.sort(np.random.default_rng(0).choice(3200, 400, replace=False)))
    draw = trained_state(UncertainIndex(RowsPosterior(), **settings).train(rows[picked]))["faiss"]
    assert trained_on(DataLoader(dataset, batch_size=200, shuffle=True)) == draw
    first = trained_state(UncertainIndex(RowsPosterior(), **settings).train(rows[1000:1400]))["faiss"]
    assert trained_on(DataLoader(dataset, batch_size=200, sampler=list(range(1000, 2000)))) == first
    assert trained_on(DataLoader(dataset, batch_size=200, drop_last=True)) != draw
