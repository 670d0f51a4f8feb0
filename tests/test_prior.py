"""prior_precision="marglik": the exact maximiser of the Laplace marginal likelihood, checked
against laplace-torch's own log marginal likelihood of the same diagonal posterior."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lam_plugin.prior import marglik_prior_precision


class _Flat(nn.Module):
    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())


def _laplace_torch(h: torch.Tensor, mean: torch.Tensor):
    """laplace-torch's DiagLaplace holding the curvature ``h`` at ``mean`` (float64)."""
    laplace = pytest.importorskip("laplace")
    la = laplace.DiagLaplace(_Flat(mean), likelihood="regression", prior_precision=1.0)
    la.H, la.mean, la.loss, la.n_data, la.n_outputs = h.clone(), mean.clone(), 0.0, 10, 1
    return la


@pytest.mark.parametrize(
    "scale_h, scale_mean, size",
    [(10.0, 0.3, 500), (1e6, 1e-3, 100), (1e3, 30.0, 100), (1.0, 0.05, 20000)],
)
def test_marglik_is_the_maximum_of_laplace_torch_objective(scale_h, scale_mean, size):
    g = torch.Generator().manual_seed(0)
    h = torch.rand(size, generator=g, dtype=torch.float64) * scale_h
    h[: size // 3] = 0  # weights without curvature, as a relu leaves many
    mean = torch.randn(size, generator=g, dtype=torch.float64) * scale_mean
    delta = marglik_prior_precision(h, mean)
    la = _laplace_torch(h, mean)

    def objective(value: float) -> float:
        return float(la.log_marginal_likelihood(prior_precision=torch.tensor(value, dtype=torch.float64)))

    best = objective(delta)
    for factor in (1.001, 1 / 1.001, 1.1, 1 / 1.1, 10.0, 0.1):
        assert objective(delta * factor) < best
    # laplace-torch's own optimiser (100 Adam steps from 1) ends no higher
    la.optimize_prior_precision(
        pred_type="glm", method="marglik", n_steps=100, lr=0.1, init_prior_prec=1.0, prior_structure="scalar"
    )
    assert objective(float(torch.as_tensor(la.prior_precision).reshape(-1)[0])) <= best


def test_marglik_without_a_maximum_is_refused():
    h, mean = torch.rand(20), torch.randn(20)
    with pytest.raises(ValueError, match="the curvature is zero everywhere"):
        marglik_prior_precision(torch.zeros(20), mean)
    with pytest.raises(ValueError, match="the weights of the subset are all zero"):
        marglik_prior_precision(h, torch.zeros(20))
    with pytest.raises(ValueError, match="differ in shape"):
        marglik_prior_precision(h, mean[:5])
    # negative curvature entries count as zero
    assert marglik_prior_precision(torch.cat([h, -torch.ones(3)]), torch.cat([mean, torch.zeros(3)])) == pytest.approx(
        marglik_prior_precision(h, mean), rel=1e-12
    )
