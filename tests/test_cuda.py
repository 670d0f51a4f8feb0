"""The CUDA path gives the CPU path's numbers.

Each test builds a float64 model and data on the CPU, runs the same calls on a copy
moved to the GPU, and compares. float64 keeps TF32 convolutions out of the comparison.
Weight samples drawn with a CPU ``torch.Generator`` are drawn on the CPU and moved, so
seeded samples, online-LAM noise and index searches do not depend on the device.

Skipped without a CUDA device; on a GPU machine: ``pytest -m cuda``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference_models import MODELS, build_model, paper_cnn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin import EmbeddingPosterior, LaplaceEmbedder, UncertainIndex
from lam_study.baselines import PFE, DeepEnsemble, MCDropout
from lam_study.training import train_contrastive

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).norm() / b.cpu().norm().clamp_min(1e-30))


def _on_gpu(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(CUDA)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_curvature_on_cuda_matches_cpu(model_name: str, subset: str) -> None:
    model, batches, key, backpack_ok = build_model(model_name, torch.float64)
    gpu = _on_gpu(model)
    before = _state(gpu)
    for backend in ["torch.func", "auto"] + (["backpack"] if backpack_ok else []):
        for geometry, approx in (("arccos", "fix"), ("euclidean", "pos"), ("arccos", "full")):
            kw = dict(subset=subset, backend=backend, geometry=geometry, approx=approx, output_key=key, progress=False)
            on_cpu = LaplaceEmbedder(model, **kw).fit(batches)
            on_gpu = LaplaceEmbedder(gpu, **kw).fit(batches)  # CPU batches, moved by fit
            assert on_gpu.curvature.device.type == "cuda" and on_gpu.mean.device.type == "cuda"
            assert on_gpu.stats.backend == on_cpu.stats.backend
            assert on_cpu.curvature.abs().max() > 0
            assert _relerr(on_gpu.curvature, on_cpu.curvature) <= 1e-8, (backend, geometry, approx)
    after = _state(gpu)
    assert all(t.device.type == "cuda" and torch.equal(t, before[k]) for k, t in after.items())


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_samples_and_predictions_on_cuda_match_cpu(subset: str) -> None:
    model, batches, _, _ = build_model("res_cnn_bn", torch.float64)
    gpu = _on_gpu(model)
    on_cpu = LaplaceEmbedder(model, subset=subset, prior_precision=10.0, progress=False).fit(batches)
    on_gpu = LaplaceEmbedder(gpu, subset=subset, prior_precision=10.0, progress=False).fit(batches)
    x = batches[0][0]
    a = on_cpu.sample(x, n=7, generator=torch.Generator().manual_seed(3))
    b = on_gpu.sample(x, n=7, generator=torch.Generator().manual_seed(3))
    assert b.device.type == "cuda" and b.shape == a.shape == (7, 6, 4)
    assert a.std(0).sum() > 0
    torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-12)
    c = on_gpu.sample(x, n=7, generator=torch.Generator(device="cuda").manual_seed(3), chunk_size=2)
    assert c.device.type == "cuda" and torch.isfinite(c).all() and not torch.allclose(c, b)
    p = on_cpu.predict(x, n=9, generator=torch.Generator().manual_seed(5))
    q = on_gpu.predict(x, n=9, generator=torch.Generator().manual_seed(5))
    for name in ("mean", "std", "uncertainty"):
        torch.testing.assert_close(getattr(q, name).cpu(), getattr(p, name), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_online_lam_on_cuda_matches_cpu(subset: str) -> None:
    torch.manual_seed(0)
    model = paper_cnn(3, normalize=False).double()
    gpu = _on_gpu(model)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 1, 28, 28, generator=g, dtype=torch.float64), torch.arange(24) % 3)
    posts = [
        LaplaceEmbedder(m, subset=subset, progress=False).fit_online(DataLoader(data, batch_size=8), epochs=2, lr=1e-2)
        for m in (model, gpu)
    ]
    assert posts[1].curvature.device.type == "cuda"
    assert posts[1].stats.n_batches == posts[0].stats.n_batches == 6
    assert _relerr(posts[1].mean, posts[0].mean) <= 1e-8
    assert _relerr(posts[1].curvature, posts[0].curvature) <= 1e-8
    for (name, p_cpu), p_gpu in zip(model.named_parameters(), gpu.parameters()):
        assert p_gpu.device.type == "cuda"
        assert _relerr(p_gpu.detach(), p_cpu.detach()) <= 1e-8, name


def test_posterior_saved_on_cuda_loads_on_cpu(tmp_path) -> None:
    model, batches, _, _ = build_model("res_cnn_bn", torch.float64)
    gpu = _on_gpu(model)
    post = LaplaceEmbedder(gpu, subset="all", progress=False).fit(batches)
    post.save(tmp_path / "p.safetensors")
    back = EmbeddingPosterior.load(tmp_path / "p.safetensors", model)
    assert back.curvature.device.type == "cpu"
    torch.testing.assert_close(back.curvature, post.curvature.cpu(), rtol=0, atol=0)
    again = EmbeddingPosterior.load(tmp_path / "p.safetensors", gpu)
    assert again.mean.device.type == "cuda"


def test_index_over_a_cuda_posterior_matches_cpu() -> None:
    model, batches, _, _ = build_model("res_cnn_bn", torch.float64)
    gpu = _on_gpu(model)
    x = torch.cat([b[0] for b in batches])
    results = []
    for m in (model, gpu):
        post = LaplaceEmbedder(m, subset="all", prior_precision=10.0, progress=False).fit(batches)
        index = UncertainIndex(post, n_samples=8, progress=False).add(x)
        results.append(index.search(x[:4], k=5))
    assert (results[0].ids == results[1].ids).all()
    torch.testing.assert_close(torch.as_tensor(results[1].distances), torch.as_tensor(results[0].distances), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(results[1].variances), torch.as_tensor(results[0].variances), rtol=1e-5, atol=1e-7)


def test_training_and_baselines_on_cuda() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4)).to(CUDA)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(96, 1, 8, 8, generator=g), torch.arange(96) % 4
    history = train_contrastive(net, images, labels, epochs=2, batch_size=32, device="cuda", progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history.epoch_losses)))
    assert next(net.parameters()).device.type == "cuda"
    x = images[:5]
    mc = MCDropout(net, n=6, seed=0).predict(x)
    assert mc.mean.shape == (5, 4) and mc.mean.device.type == "cuda" and (mc.std > 0).any()
    members = [copy.deepcopy(net) for _ in range(2)]
    with torch.no_grad():
        members[1][1].weight.mul_(1.1)
    ens = DeepEnsemble(members).predict(x)
    ref = DeepEnsemble([m.cpu() for m in copy.deepcopy(members)]).predict(x)
    torch.testing.assert_close(ens.mean.cpu(), ref.mean, rtol=1e-4, atol=1e-5)
    pfe = PFE(net, seed=0)
    pfe.fit(images, labels, epochs=2, batch_size=32)
    pred = pfe.predict(x)
    assert pred.std.device.type == "cuda" and torch.isfinite(pred.std).all() and (pred.std > 0).all()
