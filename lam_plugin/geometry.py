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
not exactly aligned (docs/design.md §2 uses the exact Hessian), so ``"pos"`` sums can
have negative entries too (6 % of the last-layer weights of the paper's CNN on one
batch of 16 random images, in a test). Every sum is therefore treated as signed: a fit
keeps it, the posterior uses its ``relu`` (``EmbeddingPosterior``), online LAM clamps
each step's term.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from .pairs import PairSet

__all__ = ["APPROXES", "GEOMETRIES", "Approx", "ArccosGeometry", "EuclideanGeometry", "Geometry", "LowRankBlocks", "OutputHessian", "output_hessian", "pair_blocks", "resolve_geometry"]

Approx = Literal["pos", "fix", "full"]
APPROXES = ("pos", "fix", "full")


def _outer(u: Tensor, v: Tensor) -> Tensor:
    """Batched outer products ``[P, D] x [P, D] -> [P, D, D]``."""
    return u.unsqueeze(-1) * v.unsqueeze(-2)


def _polar(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(||a|| [P, 1], ||b|| [P, 1], a / ||a||, b / ||b||, I [D, D])`` of outputs ``[P, D]``."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    return na, nb, a / na, b / nb, torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


class Geometry(ABC):
    """The distance a positive pair's loss measures, as its output-space Hessian.

    A geometry gives the Gauss-Newton blocks of one positive pair (:meth:`pair_blocks`,
    dense, the reference) and the same blocks summed over a batch in structured form
    (:meth:`self_blocks`, :meth:`cross_blocks`: a multiple of the identity plus a few
    rank-one terms), which the backends contract without forming ``[D, D]`` matrices.
    ``LaplaceEmbedder(geometry=...)`` takes a registered name (:data:`GEOMETRIES`) or an
    instance of a subclass.
    """

    name: str = "geometry"

    @abstractmethod
    def pair_blocks(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Positive-pair Hessian blocks ``H11, H12, H22``, each ``[P, D, D]``, for outputs ``a, b [P, D]``."""

    @abstractmethod
    def self_blocks(self, w: Tensor, norm: Tensor, e: Tensor) -> LowRankBlocks:
        """The ``B`` blocks ``G_kk = sum_l W_kl S_kl`` from the signed pair counts ``w [B, B]``,
        the output norms ``norm [B]`` and directions ``e [B, D]`` (:class:`OutputHessian`)."""

    def cross_blocks(self, w_kl: Tensor, norm_k: Tensor, norm_l: Tensor, e_k: Tensor, e_l: Tensor) -> LowRankBlocks:
        """``C_n = w_kl[n] X_kl`` for ``N`` pairs ``(k, l)`` (``[N]`` weights and norms, ``[N, D]``
        directions), with ``X_kl = -(I - e_k e_k^T - e_l e_l^T + c_kl e_k e_l^T) / (n_k n_l)``,
        the cross block that both built-in geometries share (:class:`OutputHessian`)."""
        kappa = -w_kl / (norm_k * norm_l)
        cos = (e_k * e_l).sum(-1)
        x = torch.stack([e_k, e_l, e_k])
        y = torch.stack([-kappa[:, None] * e_k, -kappa[:, None] * e_l, (kappa * cos)[:, None] * e_l])
        return LowRankBlocks(kappa, x, y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ArccosGeometry(Geometry):
    """``1 - cos(a, b)`` on the raw outputs (docs/design.md §2): the default."""

    name = "arccos"

    def pair_blocks(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        na, nb, ah, bh, eye = _polar(a, b)
        c = (ah * bh).sum(-1)[:, None, None]
        sym = _outer(ah, bh) + _outer(bh, ah) + c * eye
        h11 = (sym - 3 * c * _outer(ah, ah)) / na.pow(2).unsqueeze(-1)
        h22 = (sym - 3 * c * _outer(bh, bh)) / nb.pow(2).unsqueeze(-1)
        cross = eye - _outer(ah, ah) - _outer(bh, bh) + c * _outer(ah, bh)
        return h11, -cross / (na * nb).unsqueeze(-1), h22

    def self_blocks(self, w: Tensor, norm: Tensor, e: Tensor) -> LowRankBlocks:
        """``alpha_k = sum_l W_kl c_kl / n_k^2`` and the terms ``e_k w_k^T + w_k e_k^T -
        3 alpha_k e_k e_k^T`` with ``w_k = sum_l W_kl e_l / n_k^2``."""
        inv = norm.pow(-2)
        partners = w @ e
        gamma = (partners * e).sum(1) * inv
        x = torch.stack([e, partners, e])
        y = torch.stack([partners * inv[:, None], e * inv[:, None], -3 * gamma[:, None] * e])
        return LowRankBlocks(gamma, x, y)


class EuclideanGeometry(Geometry):
    """``1/2 ||z_a - z_b||^2`` of the L2-normalised outputs (docs/design.md §2)."""

    name = "euclidean"

    def pair_blocks(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        na, nb, ah, bh, eye = _polar(a, b)
        pa = (eye - _outer(ah, ah)) / na.unsqueeze(-1)
        pb = (eye - _outer(bh, bh)) / nb.unsqueeze(-1)
        return pa @ pa, -(pa @ pb), pb @ pb

    def self_blocks(self, w: Tensor, norm: Tensor, e: Tensor) -> LowRankBlocks:
        """``alpha_k = sum_l W_kl / n_k^2`` and the term ``-alpha_k e_k e_k^T``."""
        omega = w.sum(1) * norm.pow(-2)
        return LowRankBlocks(omega, e[None], -(omega[:, None] * e)[None])


#: the geometries ``geometry=`` accepts by name
GEOMETRIES: dict[str, type[Geometry]] = {"arccos": ArccosGeometry, "euclidean": EuclideanGeometry}


def resolve_geometry(geometry: str | Geometry) -> Geometry:
    """A :class:`Geometry` from a registered name or an instance."""
    if isinstance(geometry, Geometry):
        return geometry
    if isinstance(geometry, str) and geometry in GEOMETRIES:
        return GEOMETRIES[geometry]()
    raise ValueError(f"geometry must be one of {tuple(GEOMETRIES)} or a Geometry instance, got {geometry!r}")


def pair_blocks(a: Tensor, b: Tensor, geometry: str | Geometry) -> tuple[Tensor, Tensor, Tensor]:
    """Positive-pair Hessian blocks ``H11, H12, H22`` (``[P, D, D]`` each) of ``geometry``."""
    return resolve_geometry(geometry).pair_blocks(a, b)


#: cost of the structured contraction of one block, per ``D P``, in dense multiply-adds
_STRUCTURED_COST = 300


@dataclass(frozen=True)
class LowRankBlocks:
    """``N`` matrices ``C_n = alpha[n] I + sum_t x[t, n] y[t, n]^T`` (``[D, D]`` each, never formed).

    Attributes:
        alpha: ``[N]``.
        x, y: ``[T, N, D]``.
    """

    alpha: Tensor
    x: Tensor
    y: Tensor

    def diagonal(self) -> Tensor:
        """``[N, D]``: ``diag(C_n) = alpha[n] + sum_t x[t, n] * y[t, n]``."""
        return self.alpha[:, None] + (self.x * self.y).sum(0)

    def sandwich(self, a: Tensor, b: Tensor) -> Tensor:
        """``[P]``: ``sum_n diag(a_n^T C_n b_n)`` for ``a, b [N, D, P]``, that is
        ``sum_n (alpha_n sum_d a_n * b_n + sum_t (x_tn . a_n) * (y_tn . b_n))``, in
        ``O(N T D P)`` where the formed ``C_n`` would cost ``O(N D^2 P)``."""
        alpha, x, y = self.alpha.to(a.dtype), self.x.to(a.dtype), self.y.to(a.dtype)
        out = torch.einsum("n,ndp->p", alpha, a * b)
        return out + (torch.einsum("tnd,ndp->tnp", x, a) * torch.einsum("tnd,ndp->tnp", y, b)).sum((0, 1))


@dataclass(frozen=True)
class OutputHessian:
    """The batch-level output Hessian G of the signed pair losses, kept as its pairs.

    G is a ``[B, B]`` grid of ``[D, D]`` blocks ``G_kl``. Let ``W [B, B]`` be the symmetric
    signed pair count (each pair ``{i, j}`` adds its sign at ``(i, j)`` and at ``(j, i)``),
    ``n_k = ||f_k||``, ``e_k = f_k / n_k`` and ``c_kl = e_k . e_l``. Then

    * ``G_kk = sum_l W_kl S_kl`` (the ``H11``/``H22`` blocks of the pairs of ``k``), with
      ``S_kl = (e_k e_l^T + e_l e_k^T + c_kl (I - 3 e_k e_k^T)) / n_k^2`` in ``arccos`` and
      ``S_kl = (I - e_k e_k^T) / n_k^2`` in ``euclidean``;
    * for ``k != l`` (only ``pos`` and ``full``), ``G_kl = W_kl X_kl`` with, in both
      geometries, ``X_kl = -(I - e_k e_k^T - e_l e_l^T + c_kl e_k e_l^T) / (n_k n_l)`` (a
      pair of an item with itself adds ``W_kk X_kk`` to ``G_kk``).

    Every block is a multiple of the identity plus a few rank-one terms in ``e_k, e_l``
    (:meth:`self_blocks`, :meth:`cross_blocks`), so structured consumers never need the
    dense ``matrix``, which is built only when first read.

    Attributes:
        f: ``[B, D]`` network outputs (detached).
        pairs: the pairs that enter G (positives only for ``approx="pos"``).
        geometry, approx: as in docs/design.md §2.
    """

    f: Tensor
    pairs: PairSet
    geometry: Geometry
    approx: Approx

    @property
    def block_diagonal(self) -> bool:
        """Whether only per-sample blocks are kept (``approx="fix"``)."""
        return self.approx == "fix"

    @cached_property
    def matrix(self) -> Tensor:
        """``[B, D, D]`` diagonal blocks when ``block_diagonal``, else ``[B*D, B*D]``."""
        return _dense(self.f, self.pairs, self.geometry, self.block_diagonal)

    def contract(self, jac: Tensor) -> Tensor:
        """``diag(J^T G J)`` for a Jacobian ``jac [B, D, P]``; returns ``[P]``.

        The dense product with :attr:`matrix` costs ``O(B^2 D^2 P)`` (``O(B D^2 P)`` block
        diagonal); the structure of the blocks gives the same sum, ``sum_k diag(J_k^T
        G_kk J_k)`` over the :meth:`self_blocks` plus ``sum_n diag(J_k^T C_n J_l)`` over
        the ``N`` folded :meth:`cross_blocks`, in ``O((B + N) D P)`` with a constant
        about 300 times larger (gathers, batched products with a few rank-one terms,
        measured on 2 CPU cores). So the structured sum is taken for wide embeddings
        (``D = 384``, 2 to 6 times faster), the dense product for narrow ones (``D = 3``).
        """
        b, d, p = jac.shape
        pairs = b + (0 if self.block_diagonal else int(torch.triu(self.signed_counts).count_nonzero()))
        if (b if self.block_diagonal else b * b) * d > _STRUCTURED_COST * pairs:
            out = self.self_blocks().sandwich(jac, jac)
            for k, l, blocks in self.cross_blocks(max(1, b)):
                out += blocks.sandwich(jac[k], jac[l])
            return out
        if self.block_diagonal:
            return (jac * torch.bmm(self.matrix.to(jac.dtype), jac)).sum(dim=(0, 1))
        flat = jac.reshape(b * d, p)
        return (flat * (self.matrix.to(jac.dtype) @ flat)).sum(dim=0)

    @cached_property
    def signed_counts(self) -> Tensor:
        """``W [B, B]``: the symmetric signed pair count."""
        bsz = self.f.shape[0]
        w = torch.zeros(bsz, bsz, dtype=self.f.dtype, device=self.f.device)
        s = self.pairs.sign.to(self.f.dtype)
        w.index_put_((self.pairs.i, self.pairs.j), s, accumulate=True)
        w.index_put_((self.pairs.j, self.pairs.i), s, accumulate=True)
        return w

    @cached_property
    def directions(self) -> tuple[Tensor, Tensor]:
        """``(n [B], e [B, D])``: the norms and unit directions of the outputs. An item in
        no pair has no block, so its norm is taken as 1: a zero-norm output there must
        not turn its zero blocks into ``0 * NaN``; in a pair it still makes them NaN, and
        the backends' finiteness check names it."""
        norm = self.f.norm(dim=-1)
        norm = torch.where(self.signed_counts.ne(0).any(dim=1), norm, torch.ones_like(norm))
        return norm, self.f / norm[:, None]

    def self_blocks(self) -> LowRankBlocks:
        """The ``B`` blocks ``G_kk = sum_l W_kl S_kl``, in ``O(B^2 D)``.

        ``arccos``: ``alpha_k = sum_l W_kl c_kl / n_k^2`` and the terms
        ``e_k w_k^T + w_k e_k^T - 3 alpha_k e_k e_k^T`` with ``w_k = sum_l W_kl e_l / n_k^2``;
        ``euclidean``: ``alpha_k = sum_l W_kl / n_k^2`` and the term ``-alpha_k e_k e_k^T``.
        The ``W_kk X_kk`` of a pair of an item with itself comes with :meth:`cross_blocks`.
        """
        norm, e = self.directions
        return self.geometry.self_blocks(self.signed_counts, norm, e)

    def cross_blocks(self, chunk: int) -> Iterator[tuple[Tensor, Tensor, LowRankBlocks]]:
        """The off-diagonal part of G folded onto ``k <= l``, in chunks of at most ``chunk`` pairs.

        Yields ``(k [N], l [N], C)`` with ``C_n = 2 W_kl X_kl`` for ``k < l`` and
        ``W_kk X_kk`` for ``k = l``, so that the off-diagonal part of ``diag(J^T G J)`` is
        ``sum_n diag(J_k^T C_n J_l)`` (``G_lk = G_kl^T``). Nothing for ``approx="fix"``.
        """
        if self.block_diagonal:
            return
        w = self.signed_counts
        norm, e = self.directions
        rows, cols = torch.triu(w).nonzero(as_tuple=True)
        for k, l in zip(rows.split(chunk), cols.split(chunk)):
            weight = w[k, l] * torch.where(k == l, 1.0, 2.0).to(w)
            yield k, l, self.geometry.cross_blocks(weight, norm[k], norm[l], e[k], e[l])


def _dense(f: Tensor, pairs: PairSet, geometry: Geometry, block_diagonal: bool) -> Tensor:
    """The materialised G: ``[B, D, D]`` per-sample blocks, or ``[B*D, B*D]``."""
    bsz, dim = f.shape
    h11, h12, h22 = geometry.pair_blocks(f[pairs.i], f[pairs.j])
    s = pairs.sign.to(f.dtype)[:, None, None]
    if block_diagonal:
        blocks = torch.zeros(bsz, dim, dim, dtype=f.dtype, device=f.device)
        blocks.index_add_(0, pairs.i, s * h11)
        blocks.index_add_(0, pairs.j, s * h22)
        return blocks
    g = torch.zeros(bsz, bsz, dim, dim, dtype=f.dtype, device=f.device)
    flat = g.view(bsz * bsz, dim, dim)
    flat.index_add_(0, pairs.i * bsz + pairs.i, s * h11)
    flat.index_add_(0, pairs.j * bsz + pairs.j, s * h22)
    flat.index_add_(0, pairs.i * bsz + pairs.j, s * h12)
    flat.index_add_(0, pairs.j * bsz + pairs.i, s * h12.transpose(1, 2))
    return g.permute(0, 2, 1, 3).reshape(bsz * dim, bsz * dim)


def output_hessian(f: Tensor, pairs: PairSet, geometry: str | Geometry, approx: Approx) -> OutputHessian:
    """The output Hessian of a batch from its signed pairs (nothing is materialised here).

    Args:
        f: ``[B, D]`` network outputs (detached).
        pairs: the pairs that count (negatives already filtered for an active hinge).
        geometry: a registered name or a :class:`Geometry` (docs/design.md §2).
        approx: ``"pos"``, ``"fix"`` or ``"full"`` (docs/design.md §2).
    """
    if approx not in APPROXES:
        raise ValueError(f"approx must be one of {APPROXES}, got {approx!r}")
    if approx == "pos":
        pairs = pairs.select(pairs.positive)
    return OutputHessian(f, pairs, resolve_geometry(geometry), approx)
