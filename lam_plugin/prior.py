"""Prior precision: a fixed value, or the maximiser of the Laplace marginal likelihood.

For a diagonal posterior with data curvature ``h`` around ``theta*`` and an isotropic
prior ``N(0, delta^-1 I)``, the Laplace log marginal likelihood depends on ``delta``
through ``-1/2 delta ||theta*||^2 - 1/2 sum log(h + delta) + P/2 log delta``.
laplace-torch's ``DiagLaplace`` already optimises exactly this; it is fed our
contrastive curvature (its own backends know only regression and classification
likelihoods, so it is given the curvature instead of computing one).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

__all__ = ["marglik_prior_precision"]

logger = logging.getLogger(__name__)


class _FlatParameters(nn.Module):
    """A module holding one flat parameter vector, so that laplace-torch can size its posterior."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.detach().clone())


def marglik_prior_precision(
    curvature: Tensor,
    mean: Tensor,
    n_data: int,
    n_outputs: int,
    *,
    init: float = 1.0,
    n_steps: int = 100,
    lr: float = 0.1,
) -> float:
    """The scalar prior precision that maximises the Laplace marginal likelihood.

    Args:
        curvature: ``[P]`` scaled data curvature (non-negative).
        mean: ``[P]`` the MAP weights ``theta*``.
        n_data, n_outputs: size of the fit data and embedding dimension (laplace-torch's
            likelihood normaliser; they do not move the optimum).
    """
    if curvature.shape != mean.shape:
        raise ValueError(f"curvature {tuple(curvature.shape)} and mean {tuple(mean.shape)} differ in shape")
    # imported here: laplace-torch is an optional dependency, and it logs through the root
    # logger at import time, which would configure logging for every importing program
    try:
        from laplace import DiagLaplace
    except ImportError as err:
        raise ImportError(
            "prior_precision='marglik' uses laplace-torch, which is not installed: pip install 'lam-plugin[marglik]'"
        ) from err

    la = DiagLaplace(_FlatParameters(mean.float().cpu()), likelihood="regression", prior_precision=init)
    la.H = curvature.detach().float().cpu().clamp_min(0)
    la.mean = mean.detach().float().cpu()
    la.loss = 0.0
    la.n_data = n_data
    la.n_outputs = n_outputs
    la.optimize_prior_precision(
        pred_type="glm", method="marglik", n_steps=n_steps, lr=lr, init_prior_prec=init, prior_structure="scalar"
    )
    value = float(torch.as_tensor(la.prior_precision).reshape(-1)[0])
    logger.info("prior precision from the marginal likelihood: %.6g", value)
    return value
