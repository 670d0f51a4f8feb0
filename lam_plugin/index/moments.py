"""Mean and variance of the distance between a random query and each random candidate.

For a query ``q ~ N(mu_q, diag(a))`` and an independent candidate ``g ~ N(mu_g, diag(b))``
with ``delta = mu_q - mu_g`` (shapes: queries ``[Qc, D]``, candidates ``[Qc, c, D]``):

* l2, the squared distance ``d^2 = ||q - g||^2``::

      E[d^2]   = ||delta||^2 + sum_d (a_d + b_d)
      Var[d^2] = 2 sum_d (a_d + b_d)^2 + 4 sum_d delta_d^2 (a_d + b_d)

* ip, the inner product ``s = q . g``::

      E[s]   = mu_q . mu_g
      Var[s] = sum_d (a_d mu_g,d^2 + b_d mu_q,d^2 + a_d b_d)

For the order of two candidates ``j`` and ``l`` of one query, ``D = d_j^2 - d_l^2`` is
normal with mean ``E[d_j^2] - E[d_l^2]`` and, because both share the query's noise,
``Var[D] = u_j + u_l + 4 sum_d a_d (mu_j,d - mu_l,d)^2`` with
``u = 2 sum_d b_d (b_d + 2 a_d + 2 delta_d^2)`` (ip: ``u = sum_d b_d (mu_q,d^2 + a_d)``
and factor 1 instead of 4).

The Monte Carlo forms take the same moments over ``n`` samples drawn under shared weight
samples instead, which keeps the dependence between query and candidate.

Written by hand: FAISS returns the distance of the means only. The closed forms work in
place on the ``[Qc, c, D]`` gathers, the search's main cost besides FAISS.
"""

from __future__ import annotations

import numpy as np

__all__ = ["closed_form", "order_closed_form", "order_samples", "sample_distances"]


def closed_form(
    q: np.ndarray, a: np.ndarray, dist: np.ndarray, mu: np.ndarray, b: np.ndarray, b_sum: np.ndarray, ip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(E, Var)``, each ``[Qc, c]``, of the distance of each query to each candidate.

    Args:
        q, a: ``[Qc, D]`` query means and variances.
        dist: ``[Qc, c]`` the distances of the means as FAISS returned them (``||delta||^2``
            or ``mu_q . mu_g``).
        mu, b: ``[Qc, c, D]`` candidate means and variances, fresh gathers: both are
            overwritten.
        b_sum: ``[Qc, c]`` ``sum_d b``.
        ip: inner product (else squared l2).
    """
    if ip:
        expected = dist.copy()
        variances = np.einsum("qcd,qd->qc", b, q * q + a)
        variances += np.einsum("qcd,qd->qc", np.square(mu, out=mu), a)
        return expected, variances
    expected = dist + a.sum(axis=1)[:, None] + b_sum
    s = b
    s += a[:, None]  # a + b
    mu -= q[:, None]  # -delta
    np.square(mu, out=mu)
    mu *= 2.0
    mu += s  # s + 2 delta^2
    return expected, 2.0 * np.einsum("qcd,qcd->qc", s, mu)


def sample_distances(gallery: np.ndarray, queries: np.ndarray, ip: bool) -> np.ndarray:
    """``[Qc, c, n]`` sample distances from ``gallery`` ``[Qc, c, n, D]`` (a fresh gather,
    overwritten for l2) and ``queries`` ``[Qc, n, D]``, sample ``i`` against sample ``i``."""
    if ip:
        return np.einsum("qcnd,qnd->qcn", gallery, queries)
    gallery -= queries[:, None]
    return np.einsum("qcnd,qcnd->qcn", gallery, gallery)


def order_closed_form(
    q: np.ndarray, a: np.ndarray, mu: np.ndarray, b: np.ndarray, expected: np.ndarray, ip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(E[D], Var[D])``, each ``[Qc, k-1]``, of ``D`` = distance of candidate ``j`` minus
    that of ``j+1``, from ``q, a`` ``[Qc, D]``, the kept candidates' ``mu, b`` ``[Qc, k, D]``
    and their ``expected`` distances ``[Qc, k]``."""
    if ip:
        u = np.einsum("qkd,qd->qk", b, q * q + a)
        factor = 1.0
    else:
        delta2 = np.square(mu - q[:, None])
        u = 2.0 * np.einsum("qkd,qkd->qk", b, b + 2.0 * (a[:, None] + delta2))
        factor = 4.0
    gap = np.square(mu[:, :-1] - mu[:, 1:])
    d_mean = expected[:, :-1] - expected[:, 1:]
    d_var = u[:, :-1] + u[:, 1:] + factor * np.einsum("qkd,qd->qk", gap, a)
    return d_mean, d_var


def order_samples(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(E[D], Var[D])``, each ``[Qc, k-1]``, as sample moments of the kept candidates'
    sample ``distances`` ``[Qc, k, n]``."""
    diff = distances[:, :-1] - distances[:, 1:]
    return diff.mean(axis=2), diff.var(axis=2, ddof=1)
