"""Layers as users leave them: forward hooks, reparametrised weights (weight and spectral
norm, pruning), tied weights and nn.Linear subclasses. The closed form and BackPACK assume
plain modules; where that is untrue they step aside, and the curvature and the samples
stay those of the model as it runs."""

from __future__ import annotations

import pytest
import torch
from test_curvature import MARGIN, _relerr, reference_curvature
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations, prune

from lam_plugin import LaplaceEmbedder
from lam_plugin.curvature.base import UnsupportedModelError


class _Net(nn.Module):
    """``head(tanh(body(x)))``; ``spare`` has the head's shape and is not run (a weight to tie)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.spare = nn.Linear(8, 4)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def _double_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return 2 * out


def _tie(net: _Net) -> None:
    net.head.weight = net.spare.weight


_CASES = {
    "forward hook": lambda net: net.head.register_forward_hook(_double_output),
    "weight norm": lambda net: parametrizations.weight_norm(net.head),
    "spectral norm": lambda net: parametrizations.spectral_norm(net.head),
    "pruned": lambda net: prune.l1_unstructured(net.head, "weight", amount=0.25),
    "tied weight": _tie,
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.arange(8) % 3) for _ in range(2)]


def _net(case: str) -> _Net:
    torch.manual_seed(0)
    net = _Net().double()
    _CASES[case](net)
    return net.eval()


@pytest.mark.parametrize("case", list(_CASES))
def test_a_last_layer_that_is_not_plain_gets_no_closed_form(case):
    net, batches = _net(case), _batches()
    post = LaplaceEmbedder(net, approx="full", margin=MARGIN, normalize=False, progress=False).fit(batches)
    # every parameter the layer uses, by the name it is registered under
    layer_params = {id(p) for p in net.head.parameters()}
    assert post.param_names == [n for n, p in net.named_parameters() if id(p) in layer_params]
    assert post.config.head is None and post.stats.backend != "last_layer"
    ref = reference_curvature(net, post.param_names, batches, "arccos", "full")
    assert _relerr(post.curvature, ref) <= 1e-8
    # the samples are the model's own outputs under the sampled weights
    x = batches[0][0][:5]
    z = post.sample(x, n=3, generator=torch.Generator().manual_seed(0))
    w = post.sample_weights(3, torch.Generator().manual_seed(0))
    sizes = [dict(net.named_parameters())[n].numel() for n in post.param_names]
    for s in range(3):
        chunks = w[s].split(sizes)
        params = {n: c.view_as(dict(net.named_parameters())[n]) for n, c in zip(post.param_names, chunks)}
        torch.testing.assert_close(z[s], functional_call(net, params, (x,)))


def test_backpack_refuses_hooks_and_classes_it_has_no_rule_for():
    net, batches = _net("forward hook"), _batches()
    with pytest.raises(UnsupportedModelError, match=r"module 'head' \(Linear\) with forward hooks"):
        LaplaceEmbedder(net, subset="all", backend="backpack", progress=False).fit(batches)

    # a parametrised Linear is a subclass made on the fly, which BackPACK's table lacks
    torch.manual_seed(0)
    net = nn.Sequential(parametrizations.weight_norm(nn.Linear(6, 8)), nn.Tanh(), nn.Linear(8, 4)).double()
    with pytest.raises(UnsupportedModelError, match=r"module '0' \(ParametrizedLinear\)"):
        LaplaceEmbedder(net, subset="all", backend="backpack", progress=False).fit(batches)
    post = LaplaceEmbedder(net, subset="all", approx="fix", margin=MARGIN, progress=False).fit(batches)
    assert post.stats.backend != "backpack"
    ref = reference_curvature(net, post.param_names, batches, "arccos", "fix")
    assert _relerr(post.curvature, ref) <= 1e-8
