"""Variances stored in a few bits per dimension (lam_plugin.index.variance_codes) and the
index that stores them."""

from __future__ import annotations

import numpy as np
import pytest
from test_index_scale import RowsPosterior, moments, prediction, watched

from lam_plugin.index import UncertainIndex, storage
from lam_plugin.index._persistence import file_config, file_tensors
from lam_plugin.index.items import ItemStore
from lam_plugin.index.variance_codes import VarianceQuantizer


def variances(n: int, dim: int, seed: int) -> np.ndarray:
    return (moments(n, seed, dim=dim)[:, 1] ** 2).numpy()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [3, 8, 130])
def test_codes_pack_the_bins_losslessly_in_bits_per_dimension(bits: int, dim: int) -> None:
    quantizer = VarianceQuantizer(bits)
    var = variances(400, dim, seed=bits)
    quantizer.train(var)
    var_sum = var.sum(axis=1, dtype=np.float32)
    codes = quantizer.encode(var, var_sum)
    assert codes.dtype == np.uint8 and codes.shape == (400, -(-dim // 8) * bits)
    # the bins, by hand: floor((sqrt(t) - lo) / width) clipped to the levels
    lo, width, _ = quantizer.state().values()
    t = var * (np.float32(1) / var_sum)[:, None]
    bins = np.clip(np.floor((np.sqrt(t) - lo) * (np.float32(1) / width)), 0, 2**bits - 1)
    unpacked = quantizer._unpack(codes, dim)
    assert (np.abs(unpacked.astype(int) - bins) <= 1).all()  # float32 rounding at a bin edge
    assert (unpacked == bins).mean() > 0.99
    np.testing.assert_array_equal(quantizer._unpack(quantizer._pack(unpacked), dim), unpacked)


def test_levels_are_the_means_of_their_training_bins() -> None:
    """Hand-computed: each level is the mean shape of the training items in its bin, so the
    decoded shapes of the training sample sum, per dimension, to the true ones."""
    var = variances(1000, 6, seed=1)
    quantizer = VarianceQuantizer(3)
    quantizer.train(var)
    var_sum = var.sum(axis=1, dtype=np.float32)
    bins = quantizer._unpack(quantizer.encode(var, var_sum), 6)
    t = var.astype(np.float64) / var_sum[:, None]
    levels = quantizer.state()["var_levels"]
    for d in range(6):
        for j in np.unique(bins[:, d]):
            np.testing.assert_allclose(levels[d, j], t[bins[:, d] == j, d].mean(), rtol=1e-5)
    decoded = quantizer.decode(quantizer.encode(var, var_sum), var_sum)
    np.testing.assert_allclose((decoded / var_sum[:, None]).sum(axis=0), t.sum(axis=0), rtol=1e-4)


def test_items_without_noise_decode_to_zero() -> None:
    var = variances(300, 16, seed=2)
    var[:4] = 0.0
    store = ItemStore("closed_form", "3bit", 2)
    store.train(var)
    store.append(np.arange(300), var, None)
    np.testing.assert_array_equal(store.variances(np.arange(4)), 0.0)
    assert store.nbytes == 300 * (2 * 3 + 12)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_three_bit_variances_stay_within_their_measured_error(metric: str) -> None:
    """60 bytes per item at D = 128; the returned variances within the figures of
    docs/design.md section 5 (0.7 % at the median, 2.5-2.8 % at the 99th percentile,
    4.8 % at most), with a margin; the means and E[d^2] untouched."""
    gallery, queries = prediction(moments(3000, 4, dim=128)), prediction(moments(100, 5, dim=128))
    indexes = {dtype: UncertainIndex(metric=metric, variance_dtype=dtype, progress=False).add(gallery) for dtype in ("3bit", "float32")}
    assert indexes["3bit"].extra_nbytes == 3000 * 60
    coarse, exact = (index.search(queries, 20, return_probabilities=True) for index in indexes.values())
    np.testing.assert_array_equal(coarse.ids, exact.ids)
    np.testing.assert_array_equal(coarse.expected, exact.expected)  # the sums are kept exactly
    rel = np.abs(coarse.variances.astype(np.float64) / exact.variances - 1)
    assert np.median(rel) < 0.01 and np.quantile(rel, 0.99) < 0.035 and rel.max() < 0.07, (np.median(rel), np.quantile(rel, 0.99))
    assert np.abs(coarse.order_probabilities - exact.order_probabilities).max() < 0.01


def test_the_quantiser_trains_like_the_index() -> None:
    gallery = moments(3000, 6)
    seen: list[int] = []
    index = UncertainIndex(RowsPosterior(), variance_dtype="3bit", train_size=1000, progress=False)
    index.add(watched(gallery, 250, index, seen))
    assert seen == [0, 0, 0, 0, *range(1000, 3000, 250)]  # a Flat index: buffered for the quantiser only
    trained = UncertainIndex(RowsPosterior(), variance_dtype="3bit", progress=False).train(gallery[:1000])
    seen.clear()
    trained.add(watched(gallery, 250, trained, seen))
    assert seen == list(range(0, 3000, 250))
    for state, other in zip(index._items.quantizer.state().values(), trained._items.quantizer.state().values(), strict=True):
        np.testing.assert_array_equal(state, other)
    small = UncertainIndex(RowsPosterior(), variance_dtype="4bit", progress=False).add(gallery[:50])
    assert small._items.quantizer.trained and len(small) == 50  # fewer items than train_size: trained on them


def test_save_load_keeps_the_codes_and_refuses_a_file_without_the_quantiser(tmp_path) -> None:
    gallery, queries = prediction(moments(800, 7)), prediction(moments(20, 8))
    index = UncertainIndex(variance_dtype="3bit", index_factory="IVF8,Flat", progress=False).add(gallery)
    index.save(tmp_path / "index.lam")
    back = UncertainIndex.load(tmp_path / "index.lam")
    a, b = index.search(queries, 5), back.search(queries, 5)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.variances, b.variances)
    back.add(prediction(moments(10, 9)))
    assert len(back) == 810
    trained = UncertainIndex(variance_dtype="3bit", progress=False).train(gallery)  # trained, no items
    trained.save(tmp_path / "trained.lam")
    reloaded = UncertainIndex.load(tmp_path / "trained.lam")
    np.testing.assert_array_equal(reloaded.add(gallery).search(queries, 5).variances, trained.add(gallery).search(queries, 5).variances)
    tensors = {name: value for name, value in file_tensors(index).items() if name != "var_levels"}
    storage.write(tmp_path / "broken.lam", tensors, file_config(index), None)  # well formed, without the levels
    with pytest.raises(ValueError, match=r"var_levels should be float32 \(16, 8\), found missing"):
        UncertainIndex.load(tmp_path / "broken.lam")


def test_stores_merge_only_with_the_same_quantiser() -> None:
    var = variances(200, 8, seed=10)
    first, second, other = (ItemStore("closed_form", "3bit", 2) for _ in range(3))
    for store in (first, second):
        store.train(var[:100])
    other.train(var[100:])
    first.append(np.arange(100), var[:100], None)
    second.append(np.arange(100, 200), var[100:], None)
    other.append(np.arange(100, 200), var[100:], None)
    with pytest.raises(ValueError, match="quantised with other bins"):
        first.extend(other)
    with pytest.raises(ValueError, match="float16"):
        first.extend(ItemStore("closed_form", "float16", 2))
    first.extend(second)
    assert len(first) == 200
    np.testing.assert_array_equal(first.variances(np.arange(100, 200)), second.variances(np.arange(100)))
    with pytest.raises(ValueError, match="ids already in the index"):
        first.extend(second)


def test_unknown_variance_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="variance_dtype must be one of 'float16', 'float32', '8bit', '4bit', '3bit', got '5bit'"):
        UncertainIndex(variance_dtype="5bit")  # type: ignore[arg-type]
