"""Reference networks, contrastive training and batched embedding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lam_plugin.modules import L2Normalize
from lam_study.models import ResidualBlock, fashionmnist_net, mlp_embedder, small_resnet
from lam_study.training import TrainingHistory, embed, train_contrastive


def clusters(n: int = 450, k: int = 3, dim: int = 16, spread: float = 1.5, seed: int = 0):
    """``k`` Gaussian clusters in ``dim`` dimensions (unit noise, centres ~ N(0, spread^2))."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * spread
    labels = torch.arange(n) % k
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def one_nn_accuracy(z: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy (recall@1) of unit-norm embeddings."""
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))
    return float((labels[sim.argmax(dim=1)] == labels).float().mean())


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------- models


def test_fashionmnist_net_layout_and_shapes():
    net = fashionmnist_net()
    assert isinstance(net, nn.Sequential)
    assert [type(m) for m in net] == [
        nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear
    ]
    assert net[-1].in_features == 9216 and net[-1].out_features == 3
    assert net(torch.randn(4, 1, 28, 28)).shape == (4, 3)

    net = fashionmnist_net(embedding_dim=16, normalize=True, dropout=0.25)
    assert isinstance(net[5], nn.Dropout) and net[5].p == 0.25
    assert isinstance(net[-1], L2Normalize)
    out = net.eval()(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))

    with pytest.raises(ValueError):
        fashionmnist_net(dropout=1.0)


def test_fashionmnist_net_channel_dropout_is_the_papers_layout():
    net = fashionmnist_net(dropout=0.05, dropout_layout="channel")
    assert [type(m) for m in net] == [
        nn.Conv2d, nn.ReLU, nn.Dropout2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Dropout2d, nn.Flatten, nn.Linear
    ]
    assert net[2].p == net[6].p == 0.05
    # dropout holds no parameters: same initial weights under one seed for every layout
    torch.manual_seed(3)
    a = fashionmnist_net(dropout=0.05, dropout_layout="channel")
    torch.manual_seed(3)
    b = fashionmnist_net()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
    with pytest.raises(ValueError, match="dropout_layout"):
        fashionmnist_net(dropout=0.05, dropout_layout="spatial")


def test_small_resnet_shapes():
    net = small_resnet()
    assert isinstance(net, nn.Sequential)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in net)
    assert sum(isinstance(m, ResidualBlock) for m in net) == 2
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 8)

    net = small_resnet(in_channels=3, embedding_dim=5, width=4, normalize=True).eval()
    out = net(torch.randn(2, 3, 17, 23))  # any image size
    assert out.shape == (2, 5)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_residual_block_is_plain_addition():
    block = ResidualBlock(4).eval()
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(block(x), x + block.body(x))


def test_mlp_embedder_shapes():
    net = mlp_embedder(10, 4)
    assert isinstance(net, nn.Sequential)
    assert any(isinstance(m, nn.LayerNorm) for m in net) and any(isinstance(m, nn.GELU) for m in net)
    assert net(torch.randn(7, 10)).shape == (7, 4)
    assert net[0].out_features == 32

    net = mlp_embedder(10, 4, hidden=8, normalize=True, dropout=0.1).eval()
    assert sum(isinstance(m, nn.Dropout) for m in net) == 2
    torch.testing.assert_close(net(torch.randn(3, 10)).norm(dim=-1), torch.ones(3))


# ---------------------------------------------------------------- training


def test_train_contrastive_learns_clusters():
    x, y = clusters()
    torch.manual_seed(0)
    model = mlp_embedder(16, 4)
    before = one_nn_accuracy(embed(model, x), y)
    history = train_contrastive(model, x, y, epochs=6, batch_size=128, lr=3e-3, progress=False)

    assert isinstance(history, TrainingHistory)
    assert len(history.epoch_losses) == 6 and len(history.batch_losses) == 6 * 4
    assert history.epoch_losses[-1] < 0.6 * history.epoch_losses[0]
    after = one_nn_accuracy(embed(model, x), y)
    assert after > 0.9  # chance is 1/3
    assert after >= before


def test_train_contrastive_with_miner_and_optimizers():
    from pytorch_metric_learning import miners

    x, y = clusters(n=200)
    torch.manual_seed(0)
    model = mlp_embedder(16, 4)
    history = train_contrastive(
        model, x, y, epochs=2, batch_size=64, miner=miners.MultiSimilarityMiner(), progress=False
    )
    assert len(history.epoch_losses) == 2 and all(torch.isfinite(torch.tensor(history.batch_losses)))

    for opt in ("sgd", "adamw", "rmsprop", torch.optim.Adam(model.parameters(), lr=1e-3)):
        train_contrastive(model, x, y, epochs=1, batch_size=64, optimizer=opt, weight_decay=1e-4, progress=False)
    with pytest.raises(ValueError):
        train_contrastive(model, x, y, epochs=1, optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError):
        train_contrastive(model, x, y[:-1], epochs=1, progress=False)


def test_train_contrastive_lr_decay_is_per_epoch():
    x, y = clusters(n=130)
    model = mlp_embedder(16, 4)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
    train_contrastive(model, x, y, epochs=3, batch_size=64, optimizer=opt, lr_decay=0.5, progress=False)
    # 130 examples, batch 64: three steps per epoch (the last batch has 2 examples)
    assert seen == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)
    with pytest.raises(ValueError, match="lr_decay"):
        train_contrastive(model, x, y, epochs=1, lr_decay=1.5, progress=False)


def test_train_contrastive_validation_and_keep_best():
    from lam_plugin.metrics import map_at_k

    x, y = clusters(n=200)
    vx, _ = clusters(n=90, seed=1)
    vy = torch.randperm(90, generator=torch.Generator().manual_seed(0)) % 3  # noisy labels: mAP wanders
    torch.manual_seed(0)
    init = mlp_embedder(16, 4)
    kw = dict(epochs=5, batch_size=64, lr=3e-2, seed=2, progress=False)

    plain, watched = copy.deepcopy(init), copy.deepcopy(init)
    h_plain = train_contrastive(plain, x, y, **kw)
    h = train_contrastive(watched, x, y, validation=(vx, vy), **kw)
    # watching changes nothing; the last score is that of the final weights
    assert h.batch_losses == h_plain.batch_losses and params_equal(plain, watched)
    assert len(h.val_map5) == 5 and h.best_epoch is None and not h_plain.val_map5
    assert h.val_map5[-1] == pytest.approx(map_at_k(embed(watched, vx), vy, 5))

    best = copy.deepcopy(init)
    h_best = train_contrastive(best, x, y, validation=(vx, vy), keep_best=True, **kw)
    assert h_best.val_map5 == h.val_map5
    b = h_best.best_epoch
    assert b == 1 + max(range(5), key=lambda i: (h.val_map5[i], -i))  # first epoch of the highest score
    assert b < 5  # this seed's best epoch is an early one: the weights really are restored
    short = copy.deepcopy(init)
    train_contrastive(short, x, y, **{**kw, "epochs": b})
    assert params_equal(best, short)
    assert map_at_k(embed(best, vx), vy, 5) == pytest.approx(max(h.val_map5))

    with pytest.raises(ValueError, match="keep_best"):
        train_contrastive(copy.deepcopy(init), x, y, keep_best=True, **kw)
    with pytest.raises(ValueError, match="labels"):
        train_contrastive(copy.deepcopy(init), x, y, validation=(vx, vy[:-1]), **kw)


def test_train_contrastive_is_deterministic_and_leaves_global_rng():
    x, y = clusters(n=150)
    torch.manual_seed(0)
    init = mlp_embedder(16, 4, dropout=0.2)  # dropout: stochastic forward passes too
    runs = []
    for seed in (3, 3, 4):
        model = copy.deepcopy(init)
        state = torch.get_rng_state()
        h = train_contrastive(model, x, y, epochs=2, batch_size=50, seed=seed, progress=False)
        assert torch.equal(torch.get_rng_state(), state)  # no lasting manual_seed side effect
        runs.append((model, h))
    (m1, h1), (m2, h2), (m3, h3) = runs
    assert h1.batch_losses == h2.batch_losses and params_equal(m1, m2)
    assert h1.batch_losses != h3.batch_losses and not params_equal(m1, m3)


def test_train_contrastive_restores_modes_and_skips_singleton_batch():
    x, y = clusters(n=129)  # last batch of 128 has a single example
    model = mlp_embedder(16, 4, dropout=0.1)
    model.eval()
    model[3].train()  # mixed modes must come back as they were
    modes = [m.training for m in model.modules()]
    h = train_contrastive(model, x, y, epochs=1, batch_size=128, progress=False)
    assert len(h.batch_losses) == 1
    assert [m.training for m in model.modules()] == modes


def test_embed_normalises_batches_and_restores_mode():
    torch.manual_seed(0)
    model = mlp_embedder(16, 4, dropout=0.5)
    x, _ = clusters(n=100)
    model.train()
    z = embed(model, x, batch_size=32)
    assert model.training and all(m.training for m in model.modules())
    assert z.shape == (100, 4)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(100))
    # eval mode (dropout off) and independent of the batch size
    torch.testing.assert_close(z, embed(model, x, batch_size=1000))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.eval()(x), dim=-1)
    torch.testing.assert_close(z, ref)
    assert not model.training
    embed(model, x)
    assert not any(m.training for m in model.modules())


def test_embed_images():
    net = fashionmnist_net(embedding_dim=3)
    z = embed(net, torch.randn(5, 1, 28, 28), batch_size=2)
    assert z.shape == (5, 3) and not z.requires_grad


def test_flush_denormals_restores_the_previous_setting():
    from lam_plugin.numerics import denormals_flushed_now, flush_denormals

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    assert not denormals_flushed_now()
    with flush_denormals():
        assert denormals_flushed_now()
        assert torch.tensor([1e-39]).mul(1.0).item() == 0.0
        with flush_denormals():  # nested: stays on, and the outer block still has it after
            pass
        assert denormals_flushed_now()
    assert not denormals_flushed_now()
    torch.set_flush_denormal(True)  # a caller's own choice survives too
    try:
        with flush_denormals():
            pass
        assert denormals_flushed_now()
    finally:
        torch.set_flush_denormal(False)
