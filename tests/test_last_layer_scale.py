"""The last layer's structured closed form against the dense one, and without dense blocks.

The dense computation materialises the output Hessian (``OutputHessian.matrix``: per-item
``[B, D, D]`` blocks or the ``[B*D, B*D]`` matrix, from ``pair_blocks``), sandwiches it
between the head's ``[D, D]`` Jacobians and contracts it with the layer inputs by einsum.
The structured path must agree with it, and a fit must never build those blocks.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from lam_plugin import L2Normalize, LaplaceEmbedder
from lam_plugin import geometry as geometry_module
from lam_plugin.calling import ModelCall
from lam_plugin.curvature.last_layer import LastLayerCurvature, apply_head
from lam_plugin.geometry import OutputHessian, output_hessian
from lam_plugin.pairs import PairSet

B, D, F = 9, 16, 5


def _random_pairs(gen: torch.Generator) -> PairSet:
    """Random pairs of both signs, in both orders, with repeats and one item paired with itself."""
    i = torch.randint(0, B, (30,), generator=gen)
    j = torch.randint(0, B, (30,), generator=gen)
    i[0] = j[0] = 3
    i[1:3], j[1:3] = torch.tensor([2, 2]), torch.tensor([5, 5])
    positive = torch.rand(30, generator=gen) < 0.5
    return PairSet(i, j, positive)


def _dense(feats: Tensor, u: Tensor, g: OutputHessian, head: str) -> Tensor:
    """``[weight, bias]`` from the materialised G and the head's ``[B, D, D]`` Jacobians."""
    eye = torch.eye(D, dtype=u.dtype)
    if head == "identity":
        jac = eye.expand(B, D, D)
    else:
        r = u.norm(dim=-1, keepdim=True)
        uh = u / r
        jac = (eye - uh[:, :, None] * uh[:, None, :]) / r[:, :, None]
    if g.block_diagonal:
        m = torch.diagonal(jac @ g.matrix @ jac, dim1=1, dim2=2)
        return torch.cat([(m.T @ feats.pow(2)).reshape(-1), m.sum(0)])
    blocks = g.matrix.reshape(B, D, B, D)
    m = torch.einsum("kdo,kdle,leo->klo", jac, blocks, jac)
    weight = torch.einsum("klo,kq,lq->oq", m, feats, feats)
    return torch.cat([weight.reshape(-1), m.sum(dim=(0, 1))])


def _engine(head: str) -> LastLayerCurvature:
    model = nn.Sequential(nn.Linear(F, D), L2Normalize() if head == "normalize" else nn.Identity()).double()
    return LastLayerCurvature(model, ModelCall(), ["0.weight", "0.bias"], "0", head)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "geometry,approx,head",
    list(itertools.product(["arccos", "euclidean"], ["fix", "pos", "full"], ["identity", "normalize"])),
)
def test_structured_diagonal_equals_the_dense_one(geometry, approx, head):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(B, F, generator=gen, dtype=torch.float64)
    u = 2 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    g = output_hessian(apply_head(u, head), _random_pairs(gen), geometry, approx)  # type: ignore[arg-type]
    got = _engine(head).from_features(feats, u, g)
    assert "matrix" not in vars(g), "the structured path materialised G"
    want = _dense(feats, u, g, head)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


def test_pairs_split_in_chunks_give_the_same_diagonal(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(B, F, generator=gen, dtype=torch.float64)
    u = torch.randn(B, D, generator=gen, dtype=torch.float64)
    g = output_hessian(apply_head(u, "normalize"), _random_pairs(gen), "arccos", "full")
    whole = _engine("normalize").from_features(feats, u, g)
    monkeypatch.setattr("lam_plugin.curvature.last_layer._CHUNK_ELEMENTS", 3 * D)
    assert torch.allclose(_engine("normalize").from_features(feats, u, g), whole, rtol=1e-12, atol=0)


def _no_dense_blocks(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("pair blocks were materialised")


@pytest.mark.parametrize("approx", ["fix", "pos", "full"])
def test_a_fit_and_an_online_step_never_build_dense_blocks(monkeypatch, approx):
    monkeypatch.setattr(geometry_module, "pair_blocks", _no_dense_blocks)
    torch.manual_seed(0)
    feat_dim, dim = 32, 256  # a dense [B*D, B*D] G would hold 8192^2 numbers
    model = nn.Sequential(nn.Linear(feat_dim, dim), L2Normalize())
    x = torch.randn(32, feat_dim)
    y = torch.arange(32) % 4
    lam = LaplaceEmbedder(model, approx=approx, progress=False)
    post = lam.fit([(x, y), (x.flip(0), y)])
    assert post.stats.backend == "last_layer"
    assert post.curvature.abs().max() > 0
    trainer = lam.online(x, dataset_size=64)
    assert trainer.backend.name == "last_layer"
    trainer.step(x, y)
    assert torch.isfinite(trainer.H).all()


@pytest.mark.parametrize("geometry, approx", list(itertools.product(["arccos", "euclidean"], ["pos", "fix", "full"])))
@pytest.mark.parametrize("cost", [0, 10**12])
def test_contract_structured_and_dense_agree(monkeypatch, geometry, approx, cost):
    """``OutputHessian.contract`` chooses the structured sum (cost 0) or the dense product
    (a huge cost) by size; both equal ``diag(J^T G J)`` with the materialised G."""
    monkeypatch.setattr(geometry_module, "_STRUCTURED_COST", cost)
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(B, D, generator=gen, dtype=torch.float64)
    g = output_hessian(f, _random_pairs(gen), geometry, approx)
    jac = torch.randn(B, D, 7, generator=gen, dtype=torch.float64)
    dense = g.matrix.reshape(B, D, B, D) if not g.block_diagonal else torch.diag_embed(
        torch.ones(B, dtype=torch.float64)
    )[:, None, :, None] * g.matrix[:, :, None, :]
    expected = torch.einsum("kdp,kdle,lep->p", jac, dense, jac)
    torch.testing.assert_close(g.contract(jac), expected, rtol=1e-12, atol=1e-12)
