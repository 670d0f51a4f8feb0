"""LaplaceEmbedder / EmbeddingPosterior behaviour: the model untouched, samples, persistence."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from reference_models import DictModel, NormMLP, ResCNN, paper_cnn, randomize_bn
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin import EmbeddingPosterior, L2Normalize, LaplaceEmbedder, Prediction


def _loader(shape, n=24, batch=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.arange(n) % classes
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _snapshot(model: nn.Module):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "attrs": {n: set(vars(m)) for n, m in model.named_modules()},
    }


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("backend", ["auto", "backpack", "torch.func"])
@pytest.mark.parametrize("name", ["paper_cnn", "res_cnn"])
def test_model_unchanged_after_fit(name, backend, subset):
    torch.manual_seed(0)
    model = paper_cnn() if name == "paper_cnn" else randomize_bn(ResCNN())
    shape = (1, 28, 28) if name == "paper_cnn" else (1, 8, 8)
    model.train()  # a user's model in train mode, with one submodule in eval
    list(model.modules())[1].eval()
    before = _snapshot(model)
    post = LaplaceEmbedder(model, subset=subset, backend=backend, progress=False).fit(_loader(shape))
    post.sample(torch.randn(2, *shape), n=3)
    after = _snapshot(model)
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for field in ("training", "classes", "hooks", "requires_grad", "grads", "attrs"):
        assert before[field] == after[field], field


def test_sample_shapes_unit_norm_and_vmap_path():
    torch.manual_seed(0)
    model = NormMLP(10, 4)
    post = LaplaceEmbedder(model, subset="all", progress=False).fit(_loader((10,)))
    x = torch.randn(5, 10)
    g = torch.Generator().manual_seed(3)
    z = post.sample(x, n=7, generator=g)
    assert z.shape == (7, 5, 4)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(7, 5))
    # the vmapped forward equals one functional_call per weight sample
    weights = post.sample_weights(7, torch.Generator().manual_seed(3))
    from lam_plugin._parameters import unflatten

    params = unflatten(weights, model, post.param_names)
    loop = torch.stack(
        [functional_call(model, {n: p[s] for n, p in params.items()}, (x,)) for s in range(7)]
    )
    torch.testing.assert_close(z, torch.nn.functional.normalize(loop, dim=-1))


def test_last_layer_sampling_runs_backbone_once_and_matches_functional_call():
    torch.manual_seed(0)
    model = paper_cnn(normalize=True)
    post = LaplaceEmbedder(model, progress=False).fit(_loader((1, 28, 28)))
    assert post.config.head == "normalize" and post.config.layer == "6"
    calls = []
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 1, 28, 28)
    z = post.sample(x, n=30, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(calls) == 1
    weights = post.sample_weights(30, torch.Generator().manual_seed(0))
    from lam_plugin._parameters import unflatten

    params = unflatten(weights, model, post.param_names)
    ref = torch.stack([functional_call(model, {n: p[s] for n, p in params.items()}, (x,)) for s in range(30)])
    torch.testing.assert_close(z, torch.nn.functional.normalize(ref, dim=-1), rtol=1e-4, atol=1e-5)


def test_predict_fields():
    model = NormMLP(10, 4)
    post = LaplaceEmbedder(model, subset="all", progress=False).fit(_loader((10,)))
    pred = post.predict(torch.randn(6, 10), n=20, return_samples=True)
    assert isinstance(pred, Prediction)
    assert pred.mean.shape == (6, 4) and pred.std.shape == (6, 4) and pred.uncertainty.shape == (6,)
    torch.testing.assert_close(pred.mean.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(pred.uncertainty, pred.std.sum(-1))
    assert pred.samples is not None and pred.samples.shape == (20, 6, 4)
    with pytest.raises(ValueError, match="n >= 2"):
        post.predict(torch.randn(2, 10), n=1)


def test_output_var_is_the_pre_normalisation_variance():
    """Last layer, arccos: output_var ~ the closed form Var(u_d) = sum_k x_k^2 s2_dk + s2_bd,
    and std/mean are those of the normalised samples drawn with the same weights."""
    torch.manual_seed(0)
    model = paper_cnn(normalize=False)
    post = LaplaceEmbedder(model, subset="last_layer", prior_precision=10.0, progress=False).fit(_loader((1, 28, 28)))
    x = torch.randn(5, 1, 28, 28)
    pred = post.predict(x, n=2000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model[:-1](x).flatten(1)
    var = post.std.pow(2)
    w_var, b_var = var[:-3].view(3, -1), var[-3:]
    closed = feats.pow(2) @ w_var.T + b_var
    torch.testing.assert_close(pred.output_var, closed, rtol=0.15, atol=0)  # MC error ~ sqrt(2/2000) = 3 %
    torch.testing.assert_close(pred.output_uncertainty, pred.output_var.sum(-1))
    again = post.predict(x, n=2000, generator=torch.Generator().manual_seed(1))
    samples = post.sample(x, n=2000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.std, samples.std(dim=0))
    assert not torch.allclose(pred.output_var, pred.std.pow(2), rtol=0.5)  # the normalisation matters here
    assert Prediction(mean=pred.mean, std=pred.std).output_uncertainty is None
    assert pred.to("cpu").output_var is not None


def test_samples_shrink_towards_mean_as_prior_grows():
    torch.manual_seed(0)
    model = paper_cnn(normalize=False)
    loader = _loader((1, 28, 28))
    x = torch.randn(6, 1, 28, 28)
    spreads = []
    for prior in (1e-2, 1e2, 1e4, 1e6, 1e8):
        post = LaplaceEmbedder(model, prior_precision=prior, progress=False).fit(loader)
        spreads.append(float(post.predict(x, n=64, generator=torch.Generator().manual_seed(0)).uncertainty.mean()))
    assert all(a > b for a, b in itertools.pairwise(spreads)), spreads
    assert spreads[-1] < 0.05 * spreads[0]


def test_save_load_identical_samples_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = paper_cnn(normalize=True)
    loader = _loader((1, 28, 28))
    post = LaplaceEmbedder(model, subset="all", prior_precision=3.0, progress=False).fit(loader)
    path = tmp_path / "posterior.safetensors"
    post.save(path)
    loaded = EmbeddingPosterior.load(path, model)
    x = torch.randn(3, 1, 28, 28)
    a = post.sample(x, n=5, generator=torch.Generator().manual_seed(11))
    b = loaded.sample(x, n=5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert torch.equal(post.precision, loaded.precision)
    assert loaded.param_names == post.param_names and loaded.config == post.config

    other_arch = paper_cnn(dim=4, normalize=True)
    with pytest.raises(ValueError, match="another model architecture"):
        EmbeddingPosterior.load(path, other_arch)
    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        other_weights[0].weight.add_(1e-3)
    with pytest.raises(ValueError, match="other weights"):
        EmbeddingPosterior.load(path, other_weights)
    with pytest.raises(ValueError, match="fitted on a torch.float32 model; this model's parameters are torch.float64"):
        EmbeddingPosterior.load(path, copy.deepcopy(model).double())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a lam-plugin posterior"):
        EmbeddingPosterior.load(bad, model)


def test_dict_input_and_output():
    class DictIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DictModel(10, 3)

        def forward(self, image: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.inner(image * scale)

    torch.manual_seed(0)
    model = DictIn()
    g = torch.Generator().manual_seed(0)
    batches = [
        ({"image": torch.randn(6, 10, generator=g), "scale": torch.ones(6, 1)}, torch.tensor([0, 0, 1, 1, 2, 2]))
        for _ in range(2)
    ]
    for subset in ("all", "last_layer"):
        post = LaplaceEmbedder(model, subset=subset, output_key="embedding", progress=False).fit(batches)
        z = post.sample(batches[0][0], n=4)
        assert z.shape == (4, 6, 3)
    assert post.param_names == ["inner.proj.weight", "inner.proj.bias"]


def test_alias_sample_embeddings_summary_and_marglik():
    model = paper_cnn(normalize=False)
    loader = _loader((1, 28, 28))
    lam = LaplaceEmbedder(model, prior_precision="marglik", progress=False)
    post = lam.fit_posterior(loader)
    assert lam.posterior is post
    assert isinstance(post.prior_precision, float) and post.prior_precision > 0
    z = lam.sample_embeddings(torch.randn(2, 1, 28, 28), n=3)
    assert z.shape == (3, 2, 3)
    text = str(post.summary(loader))
    assert "positive" in text and "prior precision" in text and "uncertainty over the given data" in text


def test_bad_arguments_have_clear_errors():
    model = NormMLP(10, 4)
    with pytest.raises(ValueError, match="approx"):
        LaplaceEmbedder(model, approx="kron")
    with pytest.raises(ValueError, match="geometry"):
        LaplaceEmbedder(model, geometry="hyperbolic")
    with pytest.raises(ValueError, match="backend"):
        LaplaceEmbedder(model, backend="asdl")
    with pytest.raises(ValueError, match="prior_precision"):
        LaplaceEmbedder(model, prior_precision="big")
    with pytest.raises(ValueError, match="margin"):
        LaplaceEmbedder(model, margin=-1)
    with pytest.raises(TypeError, match="nn.Module"):
        LaplaceEmbedder("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="match no parameter"):
        LaplaceEmbedder(model, subset=["nope"], progress=False).fit(_loader((10,)))
    with pytest.raises(ValueError, match="no batch"):
        LaplaceEmbedder(model, progress=False).fit([])
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        LaplaceEmbedder(model, progress=False).fit([torch.randn(4, 10)])
    with pytest.raises(ValueError, match="output_key"):
        LaplaceEmbedder(DictModel(), output_key="missing", progress=False).fit(_loader((10,)))
    with pytest.raises(TypeError, match="output_key"):
        LaplaceEmbedder(DictModel(), progress=False).fit(_loader((10,)))
    with pytest.raises(RuntimeError, match="fit"):
        LaplaceEmbedder(model).sample_embeddings(torch.randn(2, 10))
    # the prior precision is checked when the embedder is made, before any fit
    for bad in (0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, -1.0]), torch.tensor([[1.0]])):
        with pytest.raises(ValueError, match="prior_precision"):
            LaplaceEmbedder(model, prior_precision=bad)
    with pytest.raises(TypeError, match="prior_precision must be a number, got bool"):
        LaplaceEmbedder(model, prior_precision=True)
    with pytest.raises(ValueError, match="hessian_scale"):
        LaplaceEmbedder(model, hessian_scale=float("inf"))
    with pytest.raises(TypeError, match="chunk_size"):
        LaplaceEmbedder(model, chunk_size="a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="normalize"):
        LaplaceEmbedder(model, normalize="no")  # type: ignore[arg-type]


def test_inputs_are_checked_and_cast_to_the_model_dtype(tmp_path):
    model = NormMLP(10, 4)
    loader = _loader((10,))
    post = LaplaceEmbedder(model, progress=False).fit(loader)
    x = torch.randn(5, 10)
    # float64 data (from numpy, say) meets a float32 model: cast, same result
    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    as_float64 = post.predict(x.double(), generator=seeded()).mean
    torch.testing.assert_close(as_float64, post.predict(x, generator=seeded()).mean)
    refit = LaplaceEmbedder(model, progress=False).fit([(a.double(), b) for a, b in loader])
    assert refit.curvature.dtype == torch.float32
    with pytest.raises(TypeError, match="got ndarray .torch.from_numpy"):
        post.predict(x.numpy())
    # an [x, y] batch as a DataLoader yields it: its inputs are taken
    torch.testing.assert_close(
        post.predict([x, torch.zeros(5)], generator=seeded()).mean, post.predict(x, generator=seeded()).mean
    )
    with pytest.raises(ValueError, match="empty .0 items"):
        post.predict(x[:0])
    nan = x.clone()
    nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite value"):
        post.predict(nan)
    with pytest.raises(ValueError, match="NaN or infinite"):
        LaplaceEmbedder(model, progress=False).fit([(nan, torch.tensor([0, 0, 1, 1, 2]))])
    with pytest.raises(ValueError, match="n must be a positive int, got True"):
        post.sample(x, n=True)
    with pytest.raises(TypeError, match="labels must be numbers, got strings"):
        LaplaceEmbedder(model, progress=False).fit([(x, ["a", "b", "a", "b", "a"])])
    with pytest.raises(ValueError, match="not single items .a Dataset"):
        LaplaceEmbedder(model, progress=False).fit(TensorDataset(x, torch.arange(5)))
    with pytest.raises(ValueError, match="temperature 1e-300 takes the precision out of the range"):
        post.tempered(1e-300)
    with pytest.raises(FileNotFoundError, match="there is no folder"):
        post.save(tmp_path / "missing" / "p.safetensors")


def test_online_refuses_bad_input_and_options_before_training():
    """Nothing of the model changes: no weight, no BatchNorm statistic."""
    model = nn.Sequential(nn.Linear(10, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))
    before = _snapshot(model)
    loader = _loader((10,))
    lam = LaplaceEmbedder(model, progress=False)
    bad_options = [
        dict(max_pairs=0), dict(max_pairs=-5), dict(max_pairs=2.5), dict(lr_decay=0.0), dict(lr_decay=-1.0),
        dict(lr_decay=2.0), dict(lr=float("inf")), dict(weight_decay=float("nan")), dict(n_samples=1.5),
        dict(dataset_size=2.5), dict(dataset_size="24"),
    ]
    for options in bad_options:
        with pytest.raises((ValueError, TypeError), match=next(iter(options))):
            lam.fit_online(loader, epochs=1, **options)
    x, y = next(iter(loader))
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lam.fit_online([(x, y)], epochs=1, dataset_size=8)
    trainer = lam.online(next(iter(loader))[0], dataset_size=24)
    with pytest.raises(ValueError, match="NaN"):
        trainer.step(x, y)
    with pytest.raises(ValueError, match="one label per input"):
        trainer.step(torch.zeros(4, 10), y)
    with pytest.raises(ValueError, match="one value per weight of the posterior .52., got 3"):
        LaplaceEmbedder(model, prior_precision=torch.ones(3)).online(x[1:], dataset_size=24)
    after = _snapshot(model)
    for key in ("state", "training", "requires_grad", "hooks"):
        assert _equal(after[key], before[key]), key


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(10, 4)
        self.unused = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


@pytest.mark.parametrize("backend", ["auto", "backpack", "torch.func"])
def test_a_subset_the_output_does_not_use_is_refused(backend):
    loader = _loader((10,))
    lam = LaplaceEmbedder(_TwoHeads(), subset=["unused"], backend=backend, progress=False)
    with pytest.raises(ValueError, match=r"parameters \(unused.weight, unused.bias\) do not affect the model output"):
        lam.fit(loader)
    with pytest.raises(ValueError, match="do not affect the model output"):
        lam.fit_online(loader, epochs=1)
    # within a larger subset they are allowed: their curvature is zero
    # (euclidean "pos" sums are non-negative, so the used weights' curvature is positive)
    post = LaplaceEmbedder(
        _TwoHeads(), subset="all", backend=backend, approx="pos", geometry="euclidean", progress=False
    ).fit(loader)
    assert post.curvature[-44:].abs().max() == 0 and post.curvature[:44].abs().max() > 0


def test_a_model_trained_after_the_fit_is_reported_once(caplog):
    model = NormMLP(10, 4)
    post = LaplaceEmbedder(model, progress=False).fit(_loader((10,)))
    x = torch.randn(3, 10)
    with caplog.at_level("WARNING", logger="lam_plugin"):
        post.predict(x)
        assert not caplog.records
        with torch.no_grad():
            model.net[3].weight.add_(0.1)
        post.predict(x)
        post.predict(x)
    assert [r.getMessage()[:60] for r in caplog.records] == [
        "the model's weights in the posterior's subset have changed s"
    ]


def test_online_with_a_prior_precision_per_weight():
    torch.manual_seed(0)
    model = NormMLP(10, 4)
    loader = _loader((10,))
    prior = torch.linspace(1.0, 2.0, 52)
    post = LaplaceEmbedder(model, prior_precision=prior, progress=False).fit_online(loader, epochs=1)
    torch.testing.assert_close(post.prior_precision, prior)


def test_online_step_and_fit_online():
    torch.manual_seed(0)
    model = paper_cnn(normalize=False)
    loader = _loader((1, 28, 28), n=32, batch=16, classes=2)
    lam = LaplaceEmbedder(model, progress=False)
    trainer = lam.online(next(iter(loader))[0], dataset_size=32, lr=1e-3)
    h0 = trainer.H.clone()
    w0 = model[6].weight.detach().clone()
    c0 = model[0].weight.detach().clone()
    loss = trainer.step(*next(iter(loader)))
    assert loss > 0
    assert not torch.equal(model[6].weight, w0)  # mu moved
    assert not torch.equal(model[0].weight, c0)  # the backbone trains too
    assert (0.999 * h0 - 1e-6 <= trainer.H).all() and (0.999 * h0 < trainer.H).any()
    post = lam.fit_online(loader, epochs=1)
    assert post.stats.n_batches == 2 and post.curvature.shape == (27651,)
    assert post.config.head == "identity"
    assert post.sample(torch.randn(2, 1, 28, 28), n=3).shape == (3, 2, 3)
    # the generic (torch.func) path of online LAM, on a subset that is not the last layer
    mlp = NormMLP(10, 4)
    post = LaplaceEmbedder(mlp, subset=["net.0"], progress=False).fit_online(_loader((10,)), epochs=1)
    assert post.param_names == ["net.0.weight", "net.0.bias"]


@pytest.mark.parametrize("approx", ["fix", "pos", "full"])
def test_online_curvature_update_matches_a_post_hoc_fit_of_the_batch(approx):
    """One step adds ``dataset_size**2 / n_pairs`` times relu(h), h the GGN of the batch's
    pairs under ``approx``: checked against ``fit`` on the same batch (a prior so large
    that the sampled weights equal the mean to 1e-6)."""
    torch.manual_seed(0)
    model = paper_cnn(normalize=False)
    x, y = next(iter(_loader((1, 28, 28), n=16, batch=16, classes=3)))
    n_data = 1000
    before = copy.deepcopy(model)
    lam = LaplaceEmbedder(model, prior_precision=1e12, approx=approx, progress=False)
    trainer = lam.online(x, dataset_size=n_data, max_pairs=None)
    h0 = trainer.H.clone()
    trainer.step(x, y)
    fit = LaplaceEmbedder(before, approx=approx, progress=False).fit([(x, y)])
    n_pairs = fit.stats.n_positive + fit.stats.n_negative_active
    assert n_pairs > 0 and fit.curvature.max() > 0
    added = trainer.H - trainer.memory_factor * h0
    # ``fit`` keeps a ``pos`` sum signed (the exact arccos block Hessian is indefinite) and
    # the posterior clamps it where it is used; one online step adds relu(h)
    torch.testing.assert_close(
        added, n_data**2 / n_pairs * fit.curvature.clamp_min(0), rtol=1e-3, atol=1e-3 * float(added.abs().max())
    )
    assert trainer.posterior().config.approx == approx


@pytest.mark.parametrize("backend", ["backpack", "hooks", "last_layer"])
def test_online_lam_runs_on_every_backend(backend):
    """Online LAM goes through the backend interface (``batch_at``): one step on each
    backend adds the same curvature, at the sampled weights, as torch.func (which never
    writes to the model), and leaves the same weights after the optimiser's step (the
    backends that write the sampled weights into the model put them back)."""
    x, y = torch.randn(12, 10, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
    subset = "last_layer" if backend == "last_layer" else "all"
    runs = {}
    for name in ("torch.func", backend):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4), L2Normalize())
        lam = LaplaceEmbedder(model, subset=subset, backend=name, prior_precision=10.0, progress=False)
        trainer = lam.online(x, dataset_size=100, max_pairs=None)
        trainer.step(x, y)
        assert trainer.backend.name == name and trainer.posterior().stats.backend == f"online/{name}"
        runs[name] = trainer.H.clone(), model.state_dict()
    (h_ref, w_ref), (h, w) = runs["torch.func"], runs[backend]
    assert float((h_ref - 100 * 0.999).abs().max()) > 0
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4 * float(h_ref.abs().max()))
    for k, v in w_ref.items():
        torch.testing.assert_close(w[k], v)


def test_tempered_and_calibrated_posterior():
    from lam_plugin.calibration import calibrate_temperature

    torch.manual_seed(0)
    model = NormMLP(10, 4)
    loader = _loader((10,), n=60, batch=20, classes=3)
    post = LaplaceEmbedder(model, subset="all", progress=False).fit(loader)
    hot = post.tempered(4.0)
    torch.testing.assert_close(hot.precision, post.precision / 4.0)
    assert post.tempered(1.0).precision.equal(post.precision)
    with pytest.raises(ValueError, match="temperature"):
        post.tempered(0.0)
    x = torch.randn(90, 10)
    y = torch.arange(90) % 3
    # chunked sampling shares the weight samples across chunks
    a = post.sample(x, n=5, generator=torch.Generator().manual_seed(1))
    b = post.sample(x, n=5, generator=torch.Generator().manual_seed(1), batch_size=7)
    torch.testing.assert_close(a, b)
    calibrated, report = calibrate_temperature(post, x, y, temperatures=[1e-6, 1.0, 1e6], n=8)
    from lam_plugin.metrics import ece

    # the report's scores are the ECEs of the tempered posteriors, and the best one is chosen
    for tau, score in report.scores.items():
        samples = post.tempered(tau).sample(x, n=8, generator=torch.Generator().manual_seed(0), batch_size=1024)
        assert score == pytest.approx(ece(samples, y))
    assert report.ece == min(report.scores.values())
    torch.testing.assert_close(calibrated.precision, post.precision / report.temperature)
    with pytest.raises(ValueError, match="n must be an int of at least 2"):
        calibrate_temperature(post, x, y, n=1)
    with pytest.raises(ValueError, match="no label occurs twice"):
        calibrate_temperature(post, x[:5], torch.arange(5))
    with pytest.raises(ValueError, match="the inputs hold no batch"):
        post.summary([])


def test_loader_shape_errors():
    model = NormMLP(10, 4)
    lam = LaplaceEmbedder(model, progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        lam.fit(iter([(torch.randn(4, 10), torch.tensor([0, 0, 1, 1]))]))
    with pytest.raises(ValueError, match="4 inputs but 3 labels"):
        lam.fit([(torch.randn(4, 10), torch.tensor([0, 0, 1]))])


def test_load_refuses_other_format_version(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = NormMLP(10, 4)
    post = LaplaceEmbedder(model, subset="all", progress=False).fit(_loader((10,)))
    path = tmp_path / "p.safetensors"
    post.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = "999"
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="format version '999'"):
        EmbeddingPosterior.load(tmp_path / "future.safetensors", model)
