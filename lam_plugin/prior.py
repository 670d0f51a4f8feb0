"""Prior precision: a fixed value, or the maximiser of the Laplace marginal likelihood.

For a diagonal posterior with data curvature ``h >= 0`` around ``theta*`` and an
isotropic prior ``N(0, delta^-1 I)``, the Laplace log marginal likelihood depends on
``delta`` through

    L(delta) = -1/2 [ delta ||theta*||^2 + sum_p log(h_p + delta) - P log delta ],

    dL/d delta = 1/2 [ g(delta) - ||theta*||^2 ],   g(delta) = sum_p h_p / (delta (h_p + delta)).

``g`` falls strictly from ``+inf`` to ``0`` when some ``h_p > 0``, so ``L`` has one
maximum, the root of ``g(delta) = ||theta*||^2``, found here by bisection on ``log delta``
to float64 precision. laplace-torch optimises the same objective with a fixed number of
Adam steps from ``delta = 1``, which stops short of this root (about 15 % at common layer
sizes) and cannot leave ``[e^-10, e^10]``; the exact root costs a few dozen passes over
``h``, so it is computed by hand.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

__all__ = ["marglik_prior_precision"]

logger = logging.getLogger(__name__)

#: bisection steps on log(delta): the bracket below spans at most ~2**11 in log space,
#: so 64 halvings end far below float64's resolution of delta
_STEPS = 64


def marglik_prior_precision(curvature: Tensor, mean: Tensor) -> float:
    """The scalar prior precision ``delta`` that maximises the Laplace marginal likelihood
    (module docstring) of a diagonal posterior.

    Args:
        curvature: ``[P]`` scaled data curvature ``h``; negative entries count as 0.
        mean: ``[P]`` the MAP weights ``theta*``.

    Raises:
        ValueError: the likelihood has no maximum: the curvature is zero everywhere (it
            grows as ``delta -> 0``) or the weights are all zero (as ``delta -> inf``).
    """
    if curvature.shape != mean.shape:
        raise ValueError(f"curvature {tuple(curvature.shape)} and mean {tuple(mean.shape)} differ in shape")
    h = curvature.detach().to(torch.float64).clamp_min(0)
    h = h[h > 0]
    norm2 = float(mean.detach().to(torch.float64).square().sum())
    if h.numel() == 0:
        raise ValueError(
            "prior_precision='marglik' has no maximum: the curvature is zero everywhere (the marginal likelihood "
            "grows as the prior precision goes to 0); pass a fixed prior_precision"
        )
    if norm2 == 0.0:
        raise ValueError(
            "prior_precision='marglik' has no maximum: the weights of the subset are all zero (the marginal "
            "likelihood grows with the prior precision); pass a fixed prior_precision"
        )
    n = h.numel()
    # g(d) >= n / (2 d) for d <= min(h), and g(d) <= n / d: the root lies in [lo, hi]
    lo, hi = math.log(min(float(h.min()), n / (2 * norm2))), math.log(n / norm2)
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        delta = math.exp(mid)
        if float((h / (delta * (h + delta))).sum()) > norm2:
            lo = mid
        else:
            hi = mid
    value = math.exp(0.5 * (lo + hi))
    logger.info("prior precision from the marginal likelihood: %.6g", value)
    return value
