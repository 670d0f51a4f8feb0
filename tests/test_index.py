"""Tests of lam_plugin.index: UncertainIndex and SearchResult."""

from __future__ import annotations

import json
import math
import threading

import faiss
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin.index import FORMAT_VERSION, SearchResult, UncertainIndex
from lam_plugin.prediction import Prediction


class FakePosterior:
    """A random linear map whose weights get seeded Gaussian noise; rows normalised.

    The weight noise is drawn first from ``generator``, so identically seeded calls share
    weight samples whatever the batch.
    """

    def __init__(self, d_in: int = 12, dim: int = 6, noise: float = 0.1, seed: int = 0, fingerprint: str = "fake-a"):
        self.weight = torch.randn(d_in, dim, generator=torch.Generator().manual_seed(seed))
        self.noise = noise
        self.fingerprint = fingerprint

    def sample(self, x, n: int = 30, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x["image"] if isinstance(x, dict) else x
        weights = self.weight + self.noise * torch.randn(n, *self.weight.shape, generator=generator)
        return torch.nn.functional.normalize(torch.einsum("bi,nid->nbd", x.flatten(1).float(), weights), dim=-1)

    def predict(self, x, n: int = 30, generator: torch.Generator | None = None, return_samples: bool = False) -> Prediction:
        return Prediction.from_samples(self.sample(x, n, generator), keep_samples=return_samples)


def gaussian_prediction(n: int, dim: int, seed: int, std_scale: float = 0.05, n_samples: int | None = None) -> Prediction:
    """Unit-norm means, random per-dimension std; optional independent Gaussian samples."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    std = std_scale * torch.rand(n, dim, generator=gen)
    samples = None
    if n_samples is not None:
        samples = mean + std * torch.randn(n_samples, n, dim, generator=gen)
    return Prediction(mean=mean, std=std, samples=samples)


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    if metric == "l2":
        d = ((queries[:, None, :].astype(np.float64) - gallery[None]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
    else:
        d = queries.astype(np.float64) @ gallery.T.astype(np.float64)
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


def index_of(pred: Prediction, ids=None, **kwargs) -> UncertainIndex:
    return UncertainIndex(progress=False, **kwargs).add(pred, ids=ids)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_flat_neighbours_equal_brute_force(metric: str) -> None:
    gallery, queries = gaussian_prediction(500, 16, 0), gaussian_prediction(40, 16, 1)
    ids = np.arange(500, dtype=np.int64) * 7 + 10**12
    result = index_of(gallery, ids=ids, metric=metric).search(queries, 8)
    order, dist = brute_force(gallery.mean.numpy(), queries.mean.numpy(), 8, "l2" if metric == "l2" else "ip")
    np.testing.assert_array_equal(result.ids, ids[order])
    np.testing.assert_allclose(result.distances, dist, rtol=1e-4, atol=1e-5)
    assert result.ids.dtype == np.int64 and result.ids.shape == (40, 8)
    np.testing.assert_allclose(result.query_uncertainty, queries.uncertainty.numpy(), rtol=1e-6)


def test_ivf_with_all_lists_probed_is_exact() -> None:
    gallery, queries = gaussian_prediction(2000, 16, 2), gaussian_prediction(30, 16, 3)
    index = index_of(gallery, index_factory="IVF16,Flat")
    index.set_search_parameters("nprobe=16")
    result = index.search(queries, 5)
    order, _ = brute_force(gallery.mean.numpy(), queries.mean.numpy(), 5)
    np.testing.assert_array_equal(result.ids, order)
    flat = index_of(gallery).search(queries, 5)
    np.testing.assert_allclose(result.variances, flat.variances, rtol=1e-5)


def test_ivf_pads_missing_neighbours_and_hnsw_matches_flat() -> None:
    gallery, queries = gaussian_prediction(2000, 16, 4), gaussian_prediction(20, 16, 5)
    ivf = index_of(gallery, index_factory="IVF64,Flat")  # nprobe=1: some lists hold < k items
    result = ivf.search(queries, 60)
    assert not result.valid.all()
    assert (result.ids[~result.valid] == -1).all() and np.isinf(result.distances[~result.valid]).all()
    assert np.isnan(result.variances[~result.valid]).all()
    assert (result.variances[result.valid] >= 0).all()
    hnsw = index_of(gallery, index_factory="HNSW16").search(queries, 5)
    flat = index_of(gallery).search(queries, 5)
    same = hnsw.ids == flat.ids
    assert same.mean() > 0.9
    np.testing.assert_allclose(hnsw.variances[same], flat.variances[same], rtol=1e-5)


def test_training_needs_enough_vectors() -> None:
    with pytest.raises(ValueError, match="at least 64 vectors, got 50"):
        index_of(gaussian_prediction(50, 8, 0), index_factory="IVF64,Flat")
    with pytest.raises(ValueError, match="IDMap"):
        index_of(gaussian_prediction(50, 8, 0), index_factory="IDMap,Flat")


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_closed_form_moments_match_monte_carlo(metric: str) -> None:
    """Mean and variance of d^2 (or q.g) from 20,000 independent Gaussian draws.

    Tolerance: relative error < 5% on the variance (its sampling error from 20,000 draws
    is ~1-2%) and 4 standard errors on the mean; seeded, so the check is deterministic.
    """
    gallery, queries = gaussian_prediction(50, 32, 6, std_scale=0.2), gaussian_prediction(3, 32, 7, std_scale=0.2)
    result = index_of(gallery, metric=metric).search(queries, 5)
    rng = np.random.default_rng(0)
    n = 20_000
    for qi in range(3):
        q = queries.mean[qi].numpy() + queries.std[qi].numpy() * rng.standard_normal((n, 32))
        for j, item in enumerate(result.ids[qi]):
            g = gallery.mean[item].numpy() + gallery.std[item].numpy() * rng.standard_normal((n, 32))
            d = ((q - g) ** 2).sum(1) if metric == "l2" else (q * g).sum(1)
            assert abs(result.variances[qi, j] / d.var() - 1) < 0.05
            assert abs(result.expected[qi, j] - d.mean()) < 4 * d.std() / math.sqrt(n)


def test_variances_never_negative_and_zero_without_noise() -> None:
    gallery, queries = gaussian_prediction(200, 8, 8, std_scale=1.0), gaussian_prediction(20, 8, 9, std_scale=1.0)
    for metric in ("l2", "ip"):
        assert (index_of(gallery, metric=metric).search(queries, 10).variances >= 0).all()
    certain = Prediction(gallery.mean, torch.zeros_like(gallery.std))
    result = index_of(certain).search(Prediction(queries.mean, torch.zeros_like(queries.std)), 4)
    assert (result.variances == 0).all()
    np.testing.assert_allclose(result.expected, result.distances)


def test_user_ids_round_trip_across_adds() -> None:
    a, b = gaussian_prediction(30, 8, 10), gaussian_prediction(20, 8, 11)
    ids_a = np.array([5, 10**15, 3, *range(100, 127)], dtype=np.int64)
    ids_b = torch.arange(20) * 1000 + 7
    index = index_of(a, ids=ids_a).add(b, ids=ids_b)
    np.testing.assert_array_equal(index.ids, np.concatenate([ids_a, ids_b.numpy()]))
    both = Prediction(torch.cat([a.mean, b.mean]), torch.cat([a.std, b.std]))
    result = index.search(both, 1)  # each item is its own nearest neighbour
    np.testing.assert_array_equal(result.ids[:, 0], index.ids)
    index.add(gaussian_prediction(3, 8, 12))  # default ids continue after the largest
    np.testing.assert_array_equal(index.ids[-3:], [10**15 + 1, 10**15 + 2, 10**15 + 3])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(gaussian_prediction(2, 8, 13), ids=[4, 5])
    with pytest.raises(ValueError, match="duplicates"):
        index.add(gaussian_prediction(2, 8, 13), ids=[4, 4])
    with pytest.raises(ValueError, match="non-negative"):
        index.add(gaussian_prediction(2, 8, 13), ids=[-1, 4])
    with pytest.raises(ValueError, match=r"ids must be below 2\*\*63 \(stored as int64\), got 9223372036854775808"):
        index.add(gaussian_prediction(2, 8, 13), ids=np.array([2**63, 4], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"ids must have shape \(2,\)"):
        index.add(gaussian_prediction(2, 8, 13), ids=[4])
    assert len(index) == 53


def test_save_load_round_trip_and_refusals(tmp_path) -> None:
    posterior = FakePosterior()
    images, queries = torch.randn(60, 3, 2, 2), torch.randn(9, 3, 2, 2)
    index = UncertainIndex(posterior, progress=False, n_samples=8).add(images, ids=np.arange(60) * 3)
    path = tmp_path / "gallery.safetensors"
    index.save(path)
    loaded = UncertainIndex.load(path, posterior, progress=False)
    before, after = index.search(queries, 4, return_probabilities=True), loaded.search(queries, 4, return_probabilities=True)
    for name in ("ids", "distances", "variances", "expected", "query_uncertainty", "order_probabilities"):
        np.testing.assert_array_equal(getattr(before, name), getattr(after, name))
    assert loaded.fingerprint == "fake-a" and loaded.n_samples == 8

    with pytest.raises(ValueError, match="fingerprint 'fake-b', stored 'fake-a'"):
        UncertainIndex.load(path, FakePosterior(fingerprint="fake-b"))
    bare = UncertainIndex.load(path)  # no posterior: Prediction queries only
    prediction = posterior.predict(queries, n=8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(bare.search(prediction, 4).ids, before.ids)
    with pytest.raises(ValueError, match="no posterior"):
        bare.search(queries, 4)

    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        UncertainIndex.load(corrupted)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="safetensors cannot read it"):
        UncertainIndex.load(garbage)
    with pytest.raises(FileNotFoundError, match="no lam-plugin UncertainIndex file at"):
        UncertainIndex.load(tmp_path / "missing.safetensors")

    with safe_open(str(path), framework="np") as f:
        meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    other = tmp_path / "other_version.safetensors"
    save_file(tensors, str(other), metadata={**meta, "format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match=f"format version '{FORMAT_VERSION + 1}'"):
        UncertainIndex.load(other)
    assert json.loads(meta["config"])["dim"] == 6


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"metric": "ip"}, "corrupted: the checksum of its configuration does not match"),
        ({"metric": "ip", "checksum": None}, "inconsistent: metric 'ip', a FAISS index of metric L2"),
        ({"extra": 1, "checksum": None}, r"lacks \[\] and has unknown entries \['extra'\]"),
        ({"dim": None, "checksum": None}, r"lacks \['dim'\]"),
        ({"config": "{not json", "checksum": None}, "corrupted: its configuration is not JSON"),
    ],
)
def test_an_edited_configuration_is_refused(tmp_path, edit: dict, message: str) -> None:
    """The configuration has a checksum of its own; a file without one (written before it
    was added) is checked for the entries it must have and for its FAISS metric."""
    path = tmp_path / "gallery.safetensors"
    UncertainIndex(progress=False).add(gaussian_prediction(20, 4, 3)).save(path)
    with safe_open(str(path), framework="np") as f:
        meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    edit = dict(edit)
    if "checksum" in edit:
        del meta["config_sha256"], edit["checksum"]
    config = json.loads(meta["config"]) | {k: v for k, v in edit.items() if k != "config"}
    dropped = {k for k, v in edit.items() if v is None}
    meta["config"] = edit.get("config", json.dumps({k: v for k, v in config.items() if k not in dropped}))
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=message):
        UncertainIndex.load(path)


def test_image_tensor_dict_and_loader_inputs_agree() -> None:
    posterior = FakePosterior()
    images, labels = torch.randn(50, 3, 2, 2), torch.arange(50)
    queries = torch.randn(7, 3, 2, 2)
    kwargs = dict(progress=False, n_samples=10, batch_size=16)
    reference = UncertainIndex(posterior, **kwargs).add(images).search(queries, 5)
    expected_pred = posterior.predict(queries, n=10, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(reference.query_uncertainty, expected_pred.uncertainty.numpy(), rtol=1e-5)
    for gallery in (
        DataLoader(TensorDataset(images, labels), batch_size=7),  # (x, y) batches
        DataLoader(images, batch_size=9),  # x batches
        {"image": images},
    ):
        result = UncertainIndex(posterior, **kwargs).add(gallery).search(DataLoader(queries, batch_size=3), 5)
        np.testing.assert_array_equal(result.ids, reference.ids)
        np.testing.assert_allclose(result.variances, reference.variances, rtol=1e-4, atol=1e-7)


def test_probability_helpers_on_a_hand_computed_case() -> None:
    # query mean (1, 0), variances a = (0.01, 0.04); neighbour mean (0.4, -0.8), variances b = (0.01, 0):
    # delta = (0.6, 0.8), E[d^2] = 1 + 0.06, Var = 2 (0.02^2 + 0.04^2) + 4 (0.36 * 0.02 + 0.64 * 0.04) = 0.1352
    gallery = Prediction(torch.tensor([[0.4, -0.8]]), torch.tensor([[0.1, 0.0]]))
    query = Prediction(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.1, 0.2]]))
    result = index_of(gallery).search(query, 1, return_probabilities=True, threshold=1.06)
    np.testing.assert_allclose(result.distances, [[1.0]], rtol=1e-6)
    np.testing.assert_allclose(result.expected, [[1.06]], rtol=1e-6)
    np.testing.assert_allclose(result.variances, [[0.1352]], rtol=1e-5)
    np.testing.assert_allclose(result.within_probabilities, [[0.5]], atol=1e-6)
    np.testing.assert_allclose(result.prob_within(1.06 + math.sqrt(0.1352)), [[0.5 * (1 + math.erf(1 / math.sqrt(2)))]], atol=1e-5)
    np.testing.assert_allclose(result.confidence_bound(2.0), [[1.06 + 2 * math.sqrt(0.1352)]], rtol=1e-5)
    assert result.order_probabilities.shape == (1, 0)

    # certain query at the origin; neighbours (1, 0) and (0, 1.2) with variances 0.01 per dim:
    # E = 1.02, 1.46; Var = 0.0404, 0.058, independent; P(first nearer) = Phi(0.44 / sqrt(0.0984))
    gallery = Prediction(torch.tensor([[1.0, 0.0], [0.0, 1.2]]), torch.full((2, 2), 0.1))
    origin = Prediction(torch.zeros(1, 2), torch.zeros(1, 2))
    result = index_of(gallery).search(origin, 2, return_probabilities=True)
    np.testing.assert_allclose(result.variances, [[0.0404, 0.058]], rtol=1e-5)
    expected_p = 0.5 * (1 + math.erf(0.44 / math.sqrt(0.0984) / math.sqrt(2)))
    np.testing.assert_allclose(result.order_probabilities, [[expected_p]], atol=1e-5)

    # symmetric neighbours: a coin flip; without any noise: certain
    gallery = Prediction(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]]), torch.tensor([[0.1, 0.1], [0.1, 0.1], [0.0, 0.0]]))
    noisy_origin = Prediction(torch.zeros(1, 2), torch.full((1, 2), 0.3))
    result = index_of(gallery).search(noisy_origin, 3, return_probabilities=True)
    np.testing.assert_allclose(result.order_probabilities[0, 0], 0.5, atol=1e-6)
    exact = index_of(Prediction(gallery.mean, torch.zeros(3, 2))).search(origin, 3, return_probabilities=True)
    np.testing.assert_array_equal(exact.order_probabilities, [[0.5, 1.0]])


def test_order_probabilities_with_shared_query_noise_match_monte_carlo_mode() -> None:
    """The closed-form covariance through the query vs sample moments of 20,000 draws."""
    n = 20_000
    gallery, queries = gaussian_prediction(6, 8, 14, std_scale=0.3, n_samples=n), gaussian_prediction(2, 8, 15, std_scale=0.3, n_samples=n)
    for metric in ("l2", "ip"):
        closed = index_of(gallery, metric=metric).search(queries, 6, return_probabilities=True)
        mc = index_of(gallery, metric=metric, variance="mc", n_samples=n).search(queries, 6, return_probabilities=True)
        np.testing.assert_array_equal(closed.ids, mc.ids)
        np.testing.assert_allclose(mc.variances, closed.variances, rtol=0.05)
        np.testing.assert_allclose(mc.order_probabilities, closed.order_probabilities, atol=0.02)


def test_filtering_and_reranking() -> None:
    gallery, queries = gaussian_prediction(300, 8, 16, std_scale=0.4), gaussian_prediction(10, 8, 17, std_scale=0.4)
    index = index_of(gallery)
    full = index.search(queries, 20, return_probabilities=True, threshold=0.5)

    kept = index.search(queries, 5, threshold=0.5, min_prob=0.3, candidates=20, return_probabilities=True)
    for qi in range(10):
        passing = full.ids[qi][full.within_probabilities[qi] >= 0.3][:5]
        np.testing.assert_array_equal(kept.ids[qi][: len(passing)], passing)
        assert (kept.ids[qi][len(passing) :] == -1).all()
    assert (kept.within_probabilities[kept.valid] >= 0.3).all() and np.isnan(kept.within_probabilities[~kept.valid]).all()
    assert np.isnan(kept.order_probabilities[~(kept.valid[:, :-1] & kept.valid[:, 1:])]).all()
    none = index.search(queries, 3, threshold=1e-6, min_prob=0.99)
    assert (none.ids == -1).all() and np.isinf(none.distances).all()

    for rerank, key in (("expected", full.expected), ("lcb", full.confidence_bound(1.0))):
        result = index.search(queries, 5, rerank=rerank, z=1.0, candidates=20)
        order = np.argsort(key, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(result.ids, np.take_along_axis(full.ids, order, axis=1))
        assert (np.diff(result.expected if rerank == "expected" else result.confidence_bound(1.0), axis=1) >= 0).all()


def test_monte_carlo_mode_with_a_posterior_shares_weight_samples(tmp_path) -> None:
    posterior = FakePosterior(noise=0.3)
    images = torch.randn(40, 3, 2, 2)
    index = UncertainIndex(posterior, variance="mc", n_samples=16, progress=False).add(images)
    result = index.search(images[:5], 3, return_probabilities=True)
    # the query is in the gallery: under shared weight samples its distance to itself is 0 in every sample
    np.testing.assert_array_equal(result.ids[:, 0], np.arange(5))
    np.testing.assert_allclose(result.variances[:, 0], 0, atol=1e-8)
    assert index.extra_nbytes == 40 * 8 + 40 * 16 * 6 * 4
    index.save(tmp_path / "mc.safetensors")
    loaded = UncertainIndex.load(tmp_path / "mc.safetensors", posterior, progress=False)
    np.testing.assert_array_equal(loaded.search(images[:5], 3).variances, result.variances)
    with pytest.raises(ValueError, match="needs queries.samples"):
        index.search(gaussian_prediction(2, 6, 0), 3)


def test_concurrent_searches_equal_sequential() -> None:
    gallery = gaussian_prediction(3000, 16, 18)
    index = index_of(gallery, index_factory="IVF32,Flat")
    index.set_search_parameters("nprobe=4")
    batches = [gaussian_prediction(50, 16, 100 + i) for i in range(16)]
    sequential = [index.search(b, 10, return_probabilities=True) for b in batches]
    results: dict[int, SearchResult] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(t, 16, 8):
                results[i] = index.search(batches[i], 10, return_probabilities=True)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, expected in enumerate(sequential):
        np.testing.assert_array_equal(results[i].ids, expected.ids)
        np.testing.assert_array_equal(results[i].variances, expected.variances)
        np.testing.assert_array_equal(results[i].order_probabilities, expected.order_probabilities)


def test_adds_while_searching_are_safe() -> None:
    index = index_of(gaussian_prediction(500, 8, 19))
    queries = gaussian_prediction(20, 8, 20)
    stop, errors = threading.Event(), []

    def searcher() -> None:
        try:
            while not stop.is_set():
                result = index.search(queries, 5)
                assert (result.ids >= 0).all() and (result.variances >= 0).all()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(10):
        index.add(gaussian_prediction(100, 8, 30 + i))
    stop.set()
    for t in threads:
        t.join()
    assert not errors and len(index) == 1500


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda ix, q: ix.search(q, 0), ValueError, "k must be at least 1"),
        (lambda ix, q: ix.search(q, 2.5), TypeError, "k must be an int"),
        (lambda ix, q: ix.search(q, 101), ValueError, "k=101 exceeds the 100 items"),
        (lambda ix, q: ix.search(q, 5, candidates=3), ValueError, "candidates must be at least k=5"),
        (lambda ix, q: ix.search(q, 5, min_prob=0.5), ValueError, "min_prob needs a threshold"),
        (lambda ix, q: ix.search(q, 5, rerank="best"), ValueError, "rerank must be"),
        (lambda ix, q: ix.search(q, 5, rerank="lcb", z=float("nan")), ValueError, "z must be finite"),
        (lambda ix, q: ix.search(gaussian_prediction(3, 9, 0), 5), ValueError, "queries have dimension 9, the index has dimension 8"),
        (lambda ix, q: ix.search(Prediction(q.mean[0], q.std[0]), 5), ValueError, r"queries.mean must have shape \[B, D\]"),
        (lambda ix, q: ix.search(Prediction(q.mean, q.std[:, :4]), 5), ValueError, "queries.std must have the shape"),
        (lambda ix, q: ix.search(Prediction(q.mean.index_fill(0, torch.tensor([1]), float("nan")), q.std), 5), ValueError, "queries.mean has NaN"),
        (lambda ix, q: ix.search(Prediction(q.mean, -q.std), 5), ValueError, "queries.std has negative"),
        (lambda ix, q: ix.search(torch.randn(3, 8), 5), ValueError, "queries must be a Prediction"),
        (lambda ix, q: ix.search("images", 5), ValueError, "queries must be a Prediction"),
        (lambda ix, q: ix.add(gaussian_prediction(3, 9, 0)), ValueError, "data has dimension 9, the index has dimension 8"),
        (lambda ix, q: ix.add(Prediction(q.mean, q.std.index_fill(0, torch.tensor([0]), float("inf")))), ValueError, "data.std has NaN"),
    ],
)
def test_bad_input_is_refused(call, error, match) -> None:
    index = index_of(gaussian_prediction(100, 8, 21))
    with pytest.raises(error, match=match):
        call(index, gaussian_prediction(4, 8, 22))


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="the index is empty"):
        UncertainIndex(progress=False).search(gaussian_prediction(2, 4, 0), 1)
    with pytest.raises(ValueError, match="metric must be"):
        UncertainIndex(metric="hamming")
    with pytest.raises(ValueError, match="variance must be"):
        UncertainIndex(variance="exact")
    with pytest.raises(ValueError, match="unit-norm"):
        index_of(Prediction(2 * torch.ones(3, 4), torch.zeros(3, 4)), metric="cosine")
    with pytest.raises(TypeError, match="data must be a Prediction, a tensor"):
        UncertainIndex(FakePosterior(), progress=False).add(3)
    with pytest.raises(ValueError, match="nothing to save"):
        UncertainIndex().save("unused.safetensors")
    with pytest.raises(TypeError, match="takes a fitted posterior .* not the model"):
        UncertainIndex(torch.nn.Linear(4, 4))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="n_samples must be an int"):
        UncertainIndex(n_samples=2.7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index_factory must be a FAISS factory string"):
        UncertainIndex(index_factory="")
    bad = UncertainIndex(index_factory="NoSuchIndex", progress=False)
    with pytest.raises(ValueError, match="index_factory 'NoSuchIndex' cannot build an index of dimension 4"):
        bad.add(gaussian_prediction(10, 4, 0))
    assert len(bad) == 0  # nothing half-added: the next add with a valid index starts clean


def _faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@pytest.mark.skipif(_faiss_has_gpu(), reason="faiss has GPU support here")
def test_cuda_device_needs_faiss_gpu() -> None:
    with pytest.raises(RuntimeError, match="needs faiss with GPU support"):
        UncertainIndex(device="cuda")


class _GpuCopy:
    """Stands in for a faiss GPU index: a CPU clone that counts its searches and adds."""

    def __init__(self, index) -> None:
        self.inner, self.searches, self.adds = faiss.clone_index(index), 0, 0

    def add(self, x):
        self.adds += 1
        self.inner.add(x)

    def search(self, q, k):
        self.searches += 1
        return self.inner.search(q, k)


class _GpuParameterSpace:
    def set_index_parameters(self, copy: _GpuCopy, params: str) -> None:
        faiss.ParameterSpace().set_index_parameters(copy.inner, params)


def test_gpu_copy_takes_adds_and_is_searched_with_a_stand_in_faiss_gpu_api(tmp_path, monkeypatch) -> None:
    """The wiring of ``device="cuda:1"`` without a GPU: faiss's GPU calls are replaced by
    stand-ins that copy the CPU index and record what they got."""
    copies: list[tuple[int, _GpuCopy]] = []

    def cpu_to_gpu(resources, gpu, index):
        copies.append((gpu, _GpuCopy(index)))
        return copies[-1][1]

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", cpu_to_gpu, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", _GpuParameterSpace, raising=False)
    gallery, queries = gaussian_prediction(600, 8, 31), gaussian_prediction(20, 8, 32)
    cpu = index_of(gallery, index_factory="IVF8,Flat")
    half = [Prediction(mean=gallery.mean[part], std=gallery.std[part]) for part in (slice(0, 300), slice(300, None))]
    gpu = index_of(half[0], index_factory="IVF8,Flat", device="cuda:1")
    gpu.add(half[1])
    # one copy, made of the trained empty index and added to
    assert [(device, copy.inner.ntotal) for device, copy in copies] == [(1, 600)]
    assert copies[0][1].adds == 2 and faiss.serialize_index(copies[0][1].inner).tobytes() == faiss.serialize_index(gpu.faiss_index).tobytes()
    for index in (cpu, gpu):
        index.set_search_parameters("nprobe=8")  # every list: exact, whatever the training
    assert faiss.extract_index_ivf(copies[-1][1].inner).nprobe == 8
    expected = cpu.search(queries, 5)
    np.testing.assert_array_equal(gpu.search(queries, 5).ids, expected.ids)
    assert copies[-1][1].searches == 1
    gpu.save(tmp_path / "gpu.safetensors")
    loaded = UncertainIndex.load(tmp_path / "gpu.safetensors", device="cuda:1")
    assert len(copies) == 2 and copies[-1][1].inner.ntotal == 600
    np.testing.assert_array_equal(loaded.search(queries, 5).ids, expected.ids)
    assert copies[-1][1].searches == 1
    with pytest.raises(RuntimeError, match="faiss sees 2 CUDA device"):
        UncertainIndex(device="cuda:2")


@pytest.mark.parametrize(("shard", "factory", "copies"), [(False, "Flat", [300]), (True, "IVF4,Flat", [300]), (True, "Flat", [0])])
def test_all_gpus_are_placed_by_faiss_with_a_stand_in_api(monkeypatch, shard: bool, factory: str, copies: list[int]) -> None:
    """``device="cuda:all"`` hands the index to ``faiss.index_cpu_to_all_gpus`` with the
    sharding asked for; later adds go to the copy it returned, except for a sharded Flat
    index, whose FAISS shards take one add only: copied at the next search instead."""
    placed: list = []

    class Options:
        shard = False

    def to_all(index, co=None, ngpu=-1):
        placed.append((co.shard, _GpuCopy(index)))
        return placed[-1][1]

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all, raising=False)
    gallery = gaussian_prediction(300, 8, 33)
    index = UncertainIndex(device="cuda:all", gpu_shards=shard, index_factory=factory, progress=False)
    index.add(Prediction(mean=gallery.mean[:200], std=gallery.std[:200]))
    index.add(Prediction(mean=gallery.mean[200:], std=gallery.std[200:]))
    # the trained empty index is copied first; a sharded Flat copy takes no add: dropped
    assert [(sharded, copy.inner.ntotal, copy.adds) for sharded, copy in placed] == [
        (shard, n, 2 if n else 0) for n in copies
    ]
    expected = index.search(gallery, 3).ids
    searched = placed[-1][1]  # the sharded Flat index: copied at the search
    assert len(placed) == len(copies) + (not copies[0]) and searched.inner.ntotal == 300 and searched.searches == 1
    index.add(Prediction(mean=gallery.mean[:5] * -1, std=gallery.std[:5]))
    if copies[0]:  # the copy took the add
        assert len(placed) == 1 and placed[0][1].inner.ntotal == 305
    else:  # dropped, to be copied at the next search
        assert len(placed) == 2 and index._gpu_index is None
    assert "cuda:all" in repr(index)
    before = len(placed)
    index.remove([300, 301, 302, 303, 304])
    assert len(placed) == before + 1 and placed[-1][1].inner.ntotal == 300  # a removal copies anew
    np.testing.assert_array_equal(index.search(gallery, 3).ids, expected)
    assert placed[-1][1].searches == 1
    with pytest.raises(ValueError, match="gpu_shards=True needs device='cuda:all'"):
        UncertainIndex(device="cuda:1", gpu_shards=True)


def test_a_gpu_copy_that_fails_changes_nothing_and_is_never_stale(monkeypatch) -> None:
    """An index FAISS cannot place on the GPU is refused before anything is stored; a
    copy that cannot take an add or be made after a removal is dropped (with a warning),
    never kept stale, and the next search copies the CPU index anew."""
    failing = {"copy": False, "add": False}

    class Copy(_GpuCopy):
        def add(self, x):
            if failing["add"]:
                raise RuntimeError("out of GPU memory (stand-in)")
            super().add(x)

    def cpu_to_gpu(resources, gpu, index):
        if failing["copy"] or isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
            raise RuntimeError("cannot copy (stand-in)")
        return Copy(index)

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", cpu_to_gpu, raising=False)
    gallery = gaussian_prediction(200, 8, 35)
    hnsw = UncertainIndex(device="cuda", index_factory="HNSW8", progress=False)
    with pytest.raises(ValueError, match="faiss cannot move a 'HNSW8' index to cuda:0"):
        hnsw.add(gallery)
    assert len(hnsw) == 0 and hnsw.faiss_index is None
    index = UncertainIndex(device="cuda", progress=False).add(Prediction(mean=gallery.mean[:100], std=gallery.std[:100]))
    failing["add"] = True
    index.add(Prediction(mean=gallery.mean[100:], std=gallery.std[100:]))
    assert len(index) == index.faiss_index.ntotal == 200 and index._gpu_index is None
    failing["add"] = False
    np.testing.assert_array_equal(index.search(gallery, 1).ids[:, 0], np.arange(200))  # copied anew
    failing["copy"] = True
    index.remove([0])
    assert index._gpu_index is None  # not the copy that still holds item 0
    with pytest.raises(ValueError, match="faiss cannot move a 'Flat' index to cuda:0"):
        index.search(gallery, 1)
    failing["copy"] = False
    assert 0 not in index.search(gallery, 1).ids
    searches = index._gpu_index.searches
    big = UncertainIndex(device="cuda", progress=False).add(gaussian_prediction(2100, 4, 36))
    assert big.search(gaussian_prediction(2, 4, 37), 2049).ids.shape == (2, 2049)  # more than FAISS's GPU returns
    assert big._gpu_index.searches == 0 and index._gpu_index.searches == searches


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and _faiss_has_gpu()), reason="needs CUDA and faiss with GPU support")
@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_gpu_search_equals_cpu(factory: str) -> None:
    gallery, queries = gaussian_prediction(4000, 32, 23), gaussian_prediction(64, 32, 24)
    results = []
    for device in ("cpu", "cuda"):
        index = index_of(gallery, index_factory=factory, device=device)
        if factory != "Flat":
            index.set_search_parameters("nprobe=16")
        results.append(index.search(queries, 10, return_probabilities=True))
    cpu, gpu = results
    assert (cpu.ids == gpu.ids).mean() > 0.99  # ties may order differently
    same = cpu.ids == gpu.ids
    np.testing.assert_allclose(gpu.distances[same], cpu.distances[same], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gpu.variances[same], cpu.variances[same], rtol=1e-4)


def test_public_names_at_the_package_top_level() -> None:
    import lam_plugin

    assert lam_plugin.UncertainIndex is UncertainIndex and lam_plugin.SearchResult is SearchResult
    with pytest.raises(AttributeError, match="no attribute 'Index'"):
        lam_plugin.Index  # noqa: B018


@pytest.mark.parametrize(
    ("factory", "metric", "message"),
    [
        ("PCA8,Flat", "ip", "PCAMatrix subtracts a mean, so FAISS's inner products are not those of the embeddings"),
        ("PCA8,Flat", "cosine", r"use 'OPQ' or 'RR' \(rotations\) to reduce, or metric='l2'"),
        ("LSH", "l2", "LSH distances are Hamming counts, not l2 distances"),
    ],
)
def test_factories_whose_distances_are_not_those_of_the_means_are_refused(factory: str, metric: str, message: str) -> None:
    """FAISS's PCA centres the vectors ((q - m)·(g - m) under an inner product) and LSH
    counts bits: the moments would add variances to other distances than the means'."""
    index = UncertainIndex(index_factory=factory, metric=metric, progress=False)
    with pytest.raises(ValueError, match=message):
        index.add(gaussian_prediction(500, 16, 40))
    assert len(index) == 0 and index.faiss_index is None


def test_pca_under_l2_and_l2norm_factories_are_built_and_merged() -> None:
    """PCA keeps l2 distances but for the dimensions it drops; FAISS cannot clone an L2norm
    transform, so its trained-state digest is taken through the serialisation."""
    gallery, queries = gaussian_prediction(600, 16, 41), gaussian_prediction(10, 16, 42)
    pca = index_of(gallery, index_factory="PCA16,Flat")
    np.testing.assert_array_equal(pca.search(queries, 5).ids, index_of(gallery).search(queries, 5).ids)
    halves = [Prediction(mean=gallery.mean[part], std=gallery.std[part]) for part in (slice(0, 300), slice(300, None))]
    a = index_of(halves[0], index_factory="L2norm,Flat", metric="ip")
    b = index_of(halves[1], ids=np.arange(300, 600), index_factory="L2norm,Flat", metric="ip")
    a.merge(b)
    np.testing.assert_array_equal(a.search(queries, 5).ids, index_of(gallery, metric="ip").search(queries, 5).ids)


def test_float16_variances_of_items_almost_certain() -> None:
    """An item whose largest variance is below 2^-100 is stored without overflow: zeros
    stay zero, and the rest are off by less than 2^-110."""
    mean = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    var = torch.tensor([[1e-36] * 8, [1e-36] * 4 + [0.0] * 4, [0.0] * 8])
    index = index_of(Prediction(mean=mean, std=var.sqrt()))
    with np.errstate(all="raise"):
        stored = index._items.variances(np.arange(3))
    assert np.isfinite(stored).all() and (stored[1, 4:] == 0).all() and (stored[2] == 0).all()
    np.testing.assert_allclose(stored, var.numpy(), rtol=0, atol=2.0**-110)


def test_variance_bins_trained_on_few_items_warn(caplog) -> None:
    with caplog.at_level("WARNING", logger="lam_plugin.index.variance_codes"):
        index_of(gaussian_prediction(50, 8, 43), variance_dtype="3bit")
    assert "the 3-bit variance bins are trained on 50 items" in caplog.text


def test_queries_of_two_dimensions_are_refused_by_name() -> None:
    class Identity:  # embeds an input as itself, of any dimension
        fingerprint = "identity"

        def predict(self, x, n=30, generator=None, return_samples=False):
            return Prediction(mean=x, std=torch.full_like(x, 0.01))

    index = UncertainIndex(Identity(), progress=False).add(torch.randn(20, 8))
    with pytest.raises(ValueError, match=r"queries: cannot concatenate predictions of embedding dimensions \[6, 8\]"):
        index.search(iter([torch.randn(2, 8), torch.randn(2, 6)]), 1)


def test_a_labelled_tuple_is_one_batch_as_predict_reads_it() -> None:
    posterior, x = FakePosterior(), torch.randn(30, 12)
    want = UncertainIndex(posterior, progress=False).add(x)
    for data in ((x, torch.arange(30)), [x, torch.arange(30)]):
        index = UncertainIndex(posterior, progress=False).add(data)
        assert len(index) == 30
        np.testing.assert_array_equal(index.search(x[:4], 3).distances, want.search(x[:4], 3).distances)
