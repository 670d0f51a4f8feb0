"""Output-space Hessians of the contrastive pair loss.

For a pair ``(i, j)`` with network outputs ``a = f_i``, ``b = f_j`` (``[D]`` each), the
loss of a positive pair and its Gauss-Newton block Hessian ``[[H11, H12], [H21, H22]]``
with respect to ``(a, b)`` are:

``euclidean``: the L2 normalisation ``z = f/||f||`` is part of the network and the loss is
``1/2 ||z_a - z_b||^2``; its Hessian in z is ``[[I, -I], [-I, I]]``, so with the
normalisation Jacobians ``P_a = (I - z_a z_a^T)/||a||`` (symmetric):
``H11 = P_a P_a``, ``H12 = -P_a P_b``, ``H22 = P_b P_b``.

``arccos``: the loss is ``1/2 ||a/||a|| - b/||b|| ||^2 = 1 - c`` with ``c = cos(a, b)`` and
its exact Hessian (``â = a/||a||``, ``b̂ = b/||b||``):
``H11 = (â b̂^T + b̂ â^T + c I - 3c â â^T) / ||a||^2``,
``H22 = (â b̂^T + b̂ â^T + c I - 3c b̂ b̂^T) / ||b||^2``,
``H12 = -(I - â â^T - b̂ b̂^T + c â b̂^T) / (||a|| ||b||)``.

An active negative pair has loss ``1/2 (m - ||ẑ_a - ẑ_b||^2)``: the same blocks with a
minus sign. The batch-level output Hessian stacks the signed blocks of all pairs into
a ``[B*D, B*D]`` matrix G, and the contrastive GGN diagonal of a batch is
``diag(J^T G J)`` with ``J`` the ``[B*D, P]`` Jacobian of the outputs. ``approx="fix"``
keeps only the diagonal blocks of each pair, so G is block diagonal (``[B, D, D]``);
``"pos"`` keeps only positive pairs; ``"full"`` keeps everything.

In ``euclidean`` a positive pair's block Hessian is positive semi-definite, so ``"pos"``
sums are non-negative. In ``arccos`` it is not: ``1 - cos(a, b)`` is not convex in
``(a, b)``, and its exact block Hessian has a negative eigenvalue for every pair that is
not exactly aligned (DESIGN section 3 asks for the exact Hessian), so ``"pos"`` sums can
have negative entries too (6 % of the last-layer weights of the paper's CNN on one
batch of 16 random images, in a test). Every sum is therefore treated as signed: a fit
keeps it, the posterior uses its ``relu`` (``EmbeddingPosterior``), online LAM clamps
each step's term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .pairs import PairSet

Geometry = Literal["arccos", "euclidean"]
Approx = Literal["pos", "fix", "full"]
GEOMETRIES = ("arccos", "euclidean")
APPROXES = ("pos", "fix", "full")


def _outer(u: Tensor, v: Tensor) -> Tensor:
    """Batched outer products ``[P, D] x [P, D] -> [P, D, D]``."""
    return u.unsqueeze(-1) * v.unsqueeze(-2)


def pair_blocks(a: Tensor, b: Tensor, geometry: Geometry) -> tuple[Tensor, Tensor, Tensor]:
    """Positive-pair Hessian blocks ``H11, H12, H22``, each ``[P, D, D]``, for outputs ``a, b [P, D]``."""
    na = a.norm(dim=-1, keepdim=True)
    nb = b.norm(dim=-1, keepdim=True)
    ah, bh = a / na, b / nb
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    if geometry == "euclidean":
        pa = (eye - _outer(ah, ah)) / na.unsqueeze(-1)
        pb = (eye - _outer(bh, bh)) / nb.unsqueeze(-1)
        return pa @ pa, -(pa @ pb), pb @ pb
    if geometry == "arccos":
        c = (ah * bh).sum(-1)[:, None, None]
        sym = _outer(ah, bh) + _outer(bh, ah) + c * eye
        h11 = (sym - 3 * c * _outer(ah, ah)) / na.pow(2).unsqueeze(-1)
        h22 = (sym - 3 * c * _outer(bh, bh)) / nb.pow(2).unsqueeze(-1)
        cross = eye - _outer(ah, ah) - _outer(bh, bh) + c * _outer(ah, bh)
        h12 = -cross / (na * nb).unsqueeze(-1)
        return h11, h12, h22
    raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")


@dataclass(frozen=True)
class OutputHessian:
    """The batch-level output Hessian G of the signed pair losses.

    Attributes:
        matrix: ``[B, D, D]`` diagonal blocks when ``block_diagonal``, else ``[B*D, B*D]``.
        block_diagonal: whether only per-sample blocks are kept (``approx="fix"``).
    """

    matrix: Tensor
    block_diagonal: bool

    def contract(self, jac: Tensor) -> Tensor:
        """``diag(J^T G J)`` for a Jacobian ``jac [B, D, P]``; returns ``[P]``."""
        b, d, p = jac.shape
        if self.block_diagonal:
            return (jac * torch.bmm(self.matrix.to(jac.dtype), jac)).sum(dim=(0, 1))
        flat = jac.reshape(b * d, p)
        return (flat * (self.matrix.to(jac.dtype) @ flat)).sum(dim=0)


def output_hessian(f: Tensor, pairs: PairSet, geometry: Geometry, approx: Approx) -> OutputHessian:
    """Stack the signed pair blocks of a batch into its output Hessian.

    Args:
        f: ``[B, D]`` network outputs (detached).
        pairs: the pairs that count (negatives already filtered for an active hinge).
        geometry, approx: as in DESIGN section 3.
    """
    if approx not in APPROXES:
        raise ValueError(f"approx must be one of {APPROXES}, got {approx!r}")
    if approx == "pos":
        pairs = pairs.select(pairs.positive)
    bsz, dim = f.shape
    h11, h12, h22 = pair_blocks(f[pairs.i], f[pairs.j], geometry)
    s = pairs.sign.to(f.dtype)[:, None, None]
    if approx == "fix":
        blocks = torch.zeros(bsz, dim, dim, dtype=f.dtype, device=f.device)
        blocks.index_add_(0, pairs.i, s * h11)
        blocks.index_add_(0, pairs.j, s * h22)
        return OutputHessian(blocks, block_diagonal=True)
    g = torch.zeros(bsz, bsz, dim, dim, dtype=f.dtype, device=f.device)
    flat = g.view(bsz * bsz, dim, dim)
    flat.index_add_(0, pairs.i * bsz + pairs.i, s * h11)
    flat.index_add_(0, pairs.j * bsz + pairs.j, s * h22)
    flat.index_add_(0, pairs.i * bsz + pairs.j, s * h12)
    flat.index_add_(0, pairs.j * bsz + pairs.i, s * h12.transpose(1, 2))
    return OutputHessian(g.permute(0, 2, 1, 3).reshape(bsz * dim, bsz * dim), block_diagonal=False)
