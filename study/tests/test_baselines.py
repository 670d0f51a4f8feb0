"""Baseline uncertainty methods: deterministic, MC dropout, deep ensemble, PFE, HIB."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lam_plugin.prediction import Prediction
from lam_study.baselines import (
    HIB,
    PFE,
    DeepEnsemble,
    DeterministicEmbedder,
    MCDropout,
    UncertaintyBaseline,
    default_feature_fn,
    mls_loss,
)
from lam_study.baselines.base import InputScale
from lam_study.models import fashionmnist_net, mlp_embedder
from lam_study.training import train_contrastive

D_IN, D = 8, 4


def unit(t: torch.Tensor) -> None:
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    state, modes, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads


def dropout_bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, D)
    )


def two_classes(n: int = 400, seed: int = 0):
    """Class 0: tight cluster (std 0.05); class 1: broad cluster (std 0.6)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.stack([torch.full((D_IN,), 2.0), torch.full((D_IN,), -2.0)])
    noise = torch.where(labels[:, None] == 0, 0.05, 0.6)
    return centres[labels] + noise * torch.randn(n, D_IN, generator=g), labels


@pytest.fixture(scope="module")
def trained_embedder():
    x, y = two_classes()
    torch.manual_seed(0)
    model = mlp_embedder(D_IN, D, normalize=True)
    train_contrastive(model, x, y, epochs=3, batch_size=128, progress=False)
    return model


@pytest.fixture(scope="module")
def fitted_pfe(trained_embedder):
    x, y = two_classes()
    pfe = PFE(trained_embedder, seed=0)
    pfe.fit(x, y, epochs=0)  # builds the head
    initial = pfe.evaluate_loss(x, y)
    history = pfe.fit(x, y, epochs=15, batch_size=128, lr=3e-3)
    return pfe, initial, history


# ---------------------------------------------------------------- shared interface


def make_methods(pfe):
    torch.manual_seed(1)
    return {
        "deterministic": DeterministicEmbedder(dropout_bn_model()),
        "mc_dropout": MCDropout(dropout_bn_model(), n=10),
        "ensemble": DeepEnsemble([mlp_embedder(D_IN, D) for _ in range(3)]),
        "pfe": pfe,
    }


@pytest.mark.parametrize("name", ["deterministic", "mc_dropout", "ensemble", "pfe"])
def test_common_interface(name, fitted_pfe):
    method = make_methods(fitted_pfe[0])[name]
    assert isinstance(method, UncertaintyBaseline)
    models = method.models if name == "ensemble" else [method.model]
    for m in models:
        m.train()
    snaps = [snapshot(m) for m in models]
    x = torch.randn(6, D_IN)

    pred = method.predict(x, n=5, return_samples=True)
    assert isinstance(pred, Prediction)
    assert pred.mean.shape == pred.std.shape == (6, D)
    unit(pred.mean)
    assert pred.samples is not None and pred.samples.shape[1:] == (6, D)
    unit(pred.samples)
    assert pred.uncertainty.shape == (6,)
    assert method.predict(x, n=5).samples is None
    assert pred.output_var is not None and pred.output_var.shape == (6, D)
    assert pred.output_uncertainty.shape == (6,) and torch.all(pred.output_var >= 0)
    if name == "ensemble":  # the variance over members of their raw outputs (before normalisation)
        raw = torch.stack([copy.deepcopy(m).eval()(x).detach() for m in method.models])
        torch.testing.assert_close(pred.output_var, raw.var(dim=0))
    elif name == "pfe":  # closed form: the predicted sigma^2
        torch.testing.assert_close(pred.output_var, pred.std.pow(2))
    elif name == "deterministic":
        assert torch.all(pred.output_var == 0)

    s = method.sample(x, 5)
    expected_n = 3 if name == "ensemble" else 5
    assert s.shape == (expected_n, 6, D)
    unit(s)
    for m, snap in zip(models, snaps):
        assert_unchanged(m, snap)


# ---------------------------------------------------------------- deterministic


def test_deterministic_has_zero_std():
    model = dropout_bn_model()
    method = DeterministicEmbedder(model)
    x = torch.randn(5, D_IN)
    pred = method.predict(x, n=3, return_samples=True)
    assert torch.all(pred.std == 0) and torch.all(pred.uncertainty == 0)
    with torch.no_grad():
        ref = nn.functional.normalize(model.eval()(x), dim=-1)
    torch.testing.assert_close(pred.mean, ref)
    assert pred.samples.shape == (3, 5, D)
    assert torch.equal(pred.samples, ref.expand(3, 5, D))


# ---------------------------------------------------------------- MC dropout


def test_mc_dropout_is_stochastic_and_restores_modes():
    model = dropout_bn_model()
    x = torch.randn(64, D_IN)
    model.train()
    model(x)  # give BatchNorm non-trivial running statistics
    snap = snapshot(model)
    pred = MCDropout(model, n=50, seed=3).predict(x)
    assert torch.all(pred.uncertainty > 0)
    raw = MCDropout(model, n=50, seed=3).sample_outputs(x)
    torch.testing.assert_close(pred.output_var, raw.var(dim=0))
    torch.testing.assert_close(pred.std, nn.functional.normalize(raw, dim=-1).std(dim=0))
    assert (pred.std > 0).float().mean() > 0.9
    assert_unchanged(model, snap)  # BatchNorm stats untouched: it ran in eval mode

    model.eval()
    snap = snapshot(model)
    MCDropout(model).sample(x, 4)
    assert_unchanged(model, snap)


def test_mc_dropout_batches_passes_and_is_seedable():
    model = dropout_bn_model()
    x = torch.randn(5, D_IN)
    chunked = MCDropout(model, max_batch=10, seed=7)  # 2 passes per forward: 2+2+2+1
    s = chunked.sample(x, 7)
    assert s.shape == (7, 5, D)
    assert torch.equal(s, chunked.sample(x, 7))
    # every pass draws its own masks: samples of one input differ
    assert (s[0] - s[1]).abs().max() > 0 and (s[0] - s[2]).abs().max() > 0


def test_mc_dropout_chunks_keep_inputs_aligned():
    # with p = 0 every pass must equal the eval-mode embedding of the same input
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, D))
    model.train()
    model(torch.randn(32, D_IN))
    x = torch.randn(5, D_IN)
    s = MCDropout(model, max_batch=10).sample(x, 7)
    with torch.no_grad():
        ref = nn.functional.normalize(copy.deepcopy(model).eval()(x), dim=-1)
    torch.testing.assert_close(s, ref.expand(7, 5, D))
    assert model.training


def test_mc_dropout_needs_dropout():
    with pytest.raises(ValueError, match="Dropout"):
        MCDropout(mlp_embedder(D_IN, D))
    MCDropout(nn.Sequential(nn.Linear(D_IN, D), nn.Dropout1d(0.1)))  # any Dropout* counts
    MCDropout(fashionmnist_net(dropout=0.2))


# ---------------------------------------------------------------- deep ensemble


def test_ensemble_std_is_std_over_members():
    torch.manual_seed(0)
    members = [mlp_embedder(D_IN, D) for _ in range(4)]
    x = torch.randn(9, D_IN)
    pred = DeepEnsemble(members).predict(x, return_samples=True)
    with torch.no_grad():
        manual = torch.stack([nn.functional.normalize(m.eval()(x), dim=-1) for m in members])
    torch.testing.assert_close(pred.samples, manual)
    torch.testing.assert_close(pred.std, manual.std(dim=0))
    torch.testing.assert_close(pred.mean, nn.functional.normalize(manual.mean(0), dim=-1))
    assert torch.all(pred.uncertainty > 0)


def test_ensemble_needs_two_members():
    with pytest.raises(ValueError):
        DeepEnsemble([mlp_embedder(D_IN, D)])


def test_ensemble_members_of_different_output_sizes_are_named():
    members = [mlp_embedder(D_IN, D), mlp_embedder(D_IN, D), mlp_embedder(D_IN, D + 1)]
    with pytest.raises(ValueError, match=r"member 0 gives \(5, 4\), member 2 gives \(5, 5\)"):
        DeepEnsemble(members).predict(torch.randn(5, D_IN))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be at least 1, got 0"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int, got float"),
        ({"epochs": -1}, ValueError, "epochs must be at least 0, got -1"),
        ({"epochs": True}, TypeError, "epochs must be an int, got bool"),
        ({"lr": 0.0}, ValueError, r"lr must be a finite number in \(0, inf\)"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number"),
    ],
)
@pytest.mark.parametrize("fit", ["pfe", "hib", "train_contrastive"])
def test_training_schedules_are_checked_before_any_change(fit, kwargs, error, match):
    x, y = two_classes(n=40)
    model = mlp_embedder(D_IN, D)
    snap = snapshot(model)
    call = {
        "pfe": lambda: PFE(model).fit(x, y, **kwargs),
        "hib": lambda: HIB(model).fit(x, y, **kwargs),
        "train_contrastive": lambda: train_contrastive(model, x, y, progress=False, **kwargs),
    }[fit]
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(model, snap)


# ---------------------------------------------------------------- PFE


def test_mls_loss_matches_formula():
    mu, log_var = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 1, 0, 0])
    var = log_var.exp()
    pairs = [(0, 2), (0, 3), (2, 3)]
    ref = torch.stack(
        [((mu[i] - mu[j]) ** 2 / (var[i] + var[j]) + (var[i] + var[j]).log()).sum() for i, j in pairs]
    ).mean()
    torch.testing.assert_close(mls_loss(mu, log_var, labels), ref)
    assert mls_loss(mu, log_var, torch.arange(4)) is None


def test_pfe_fit_lowers_mls_and_keeps_embedder(trained_embedder, fitted_pfe):
    pfe, initial, history = fitted_pfe
    x, y = two_classes()
    assert history.epoch_losses[-1] < history.epoch_losses[0]
    assert pfe.evaluate_loss(x, y) < initial - 5.0

    snap = snapshot(trained_embedder)
    pred = pfe.predict(x[:10], n=4, return_samples=True)
    with torch.no_grad():
        ref = nn.functional.normalize(copy.deepcopy(trained_embedder).eval()(x[:10]), dim=-1)
    torch.testing.assert_close(pred.mean, ref)  # mean = the frozen embedding
    _mu, log_var = pfe.mean_log_var(x[:10])
    torch.testing.assert_close(pred.std, (0.5 * log_var).exp())
    assert_unchanged(trained_embedder, snap)


def test_pfe_fit_leaves_user_model_untouched():
    x, y = two_classes(n=100)
    model = mlp_embedder(D_IN, D, dropout=0.1)
    model.train()
    snap = snapshot(model)
    PFE(model).fit(x, y, epochs=2, batch_size=50)
    assert_unchanged(model, snap)


def test_pfe_feature_cache_gives_the_same_head():
    """Features computed once (cached) and per batch train the same head, step for step."""
    x, y = two_classes(n=120)
    torch.manual_seed(0)
    model = mlp_embedder(D_IN, D)
    heads, histories = [], []
    for cache_bytes in (4 * 2**30, 0):
        pfe = PFE(model)
        histories.append(pfe.fit(x, y, epochs=3, batch_size=40, lr=3e-3, seed=5, feature_cache_bytes=cache_bytes))
        heads.append(pfe.head.state_dict())
    torch.testing.assert_close(histories[0].batch_losses, histories[1].batch_losses)
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key])
    with pytest.raises(ValueError, match="feature_cache_bytes"):
        PFE(model).fit(x, y, feature_cache_bytes=-1)


def test_pfe_diverging_head_is_a_clear_error():
    """A non-finite loss stops the fit with a message, instead of a head of NaNs."""
    x, y = two_classes(n=60)
    model = mlp_embedder(D_IN, D)
    head = nn.Linear(D_IN, D)
    nn.init.constant_(head.weight, 1e3)  # log sigma^2 of order 1e3: exp overflows in float32
    with pytest.raises(FloatingPointError, match=r"PFE: the training loss is (nan|inf).*epoch 0, batch 0"):
        PFE(model, feature_fn=lambda t: t, head=head).fit(x, y, epochs=1, batch_size=30)


def test_pfe_without_any_positive_pair_is_a_clear_error():
    """Labels that never repeat within a batch leave nothing to learn: refused, not NaN losses."""
    x, _ = two_classes(n=32)
    with pytest.raises(ValueError, match="PFE: no batch of 8 had a pair to learn from"):
        PFE(mlp_embedder(D_IN, D)).fit(x, torch.arange(32), epochs=2, batch_size=8)


def test_every_baseline_refuses_bad_inputs(fitted_pfe):
    pfe, _, _ = fitted_pfe
    methods = make_methods(pfe)
    x = torch.randn(4, D_IN)
    x[1, 2] = float("nan")
    for _name, method in methods.items():
        with pytest.raises(ValueError, match="NaN or infinite"):
            method.predict(x)
        with pytest.raises(ValueError, match="empty"):
            method.predict(x[:0])
        with pytest.raises(TypeError, match="got ndarray"):
            method.predict(x.numpy())


def test_default_head_is_blind_to_the_feature_scale():
    """The default head divides its input by the features' RMS: features 1e4 times larger
    (a network trained with a large learning rate) train the same head, instead of one
    whose exp(log sigma^2) overflows."""
    x, y = two_classes(n=120)
    torch.manual_seed(0)
    model = mlp_embedder(D_IN, D)
    trunk = default_feature_fn(model)
    fits = []
    for factor in (1.0, 1e4):
        pfe = PFE(model, feature_fn=lambda t, f=factor: trunk(t) * f)
        history = pfe.fit(x, y, epochs=3, batch_size=40, lr=3e-3, seed=5)
        fits.append((pfe, history))
    (small, h_small), (large, h_large) = fits
    scale_small, scale_large = small.head[0].scale, large.head[0].scale
    torch.testing.assert_close(scale_large / scale_small, torch.tensor(1e4), rtol=1e-4, atol=0)
    with torch.no_grad():
        feats = trunk(x)  # all 120 examples (the scale uses up to 1,024)
    assert float(scale_small) == pytest.approx(float(feats.double().pow(2).mean().sqrt()), rel=1e-5)
    torch.testing.assert_close(torch.tensor(h_large.batch_losses), torch.tensor(h_small.batch_losses), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(large.mean_log_var(x)[1], small.mean_log_var(x)[1], rtol=1e-3, atol=1e-3)
    assert InputScale(2.0)(torch.tensor([4.0])).item() == 2.0
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale"):
            InputScale(bad)


def test_pfe_sigma_tracks_ambiguity_and_distance(fitted_pfe):
    pfe, _, _ = fitted_pfe
    x, y = two_classes(seed=1)  # fresh draws of the same distribution
    unc = pfe.predict(x).uncertainty
    tight, broad = unc[y == 0].mean(), unc[y == 1].mean()
    assert broad > 2 * tight  # heteroscedastic: the noisy class gets a larger sigma
    far = torch.randn(200, D_IN, generator=torch.Generator().manual_seed(2)) * 10
    assert pfe.predict(far).uncertainty.mean() > unc.mean()


def test_pfe_needs_fit_and_feature_fn_defaults():
    model = mlp_embedder(D_IN, D)
    with pytest.raises(RuntimeError):
        PFE(model).predict(torch.randn(2, D_IN))
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(default_feature_fn(model)(x), model[:6](x))  # before last Linear
        lin = nn.Sequential(nn.Linear(D_IN, D))
        torch.testing.assert_close(default_feature_fn(lin)(x), x)
        other = nn.Identity()
        torch.testing.assert_close(default_feature_fn(other)(x), x)
    net = fashionmnist_net()
    assert default_feature_fn(net)(torch.randn(2, 1, 28, 28)).shape == (2, 9216)
    custom = PFE(model, feature_fn=lambda t: t, head=nn.Linear(D_IN, D))
    assert custom.predict(x).std.shape == (3, D)


# ---------------------------------------------------------------- HIB


def test_hib_trains_and_samples():
    x, y = two_classes(n=200)
    torch.manual_seed(0)
    model = mlp_embedder(D_IN, D)
    snap = snapshot(model)
    hib = HIB(model, k=4, seed=0)
    history = hib.fit(x, y, epochs=4, batch_size=100, lr=3e-3)
    assert history.epoch_losses[-1] < history.epoch_losses[0]
    state, modes, _ = snap
    assert [m.training for m in model.modules()] == modes  # modes restored
    assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())  # trained
    pred = hib.predict(x[:6], n=8, return_samples=True)
    assert pred.samples.shape == (8, 6, D)
    unit(pred.samples)
    assert torch.all(pred.uncertainty > 0)
    assert torch.equal(hib.sample(x[:6], 3), hib.sample(x[:6], 3))  # seeded


def test_hib_frozen_embedder_is_untouched():
    x, y = two_classes(n=100)
    model = mlp_embedder(D_IN, D)
    snap = snapshot(model)
    HIB(model, k=2).fit(x, y, epochs=1, batch_size=50, train_embedder=False)
    assert_unchanged(model, snap)
