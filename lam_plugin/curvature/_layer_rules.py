"""Per-layer rules of the hooks backend: per-sample gradients of a module's parameters from
its captured input and output gradients (the formulas in :mod:`.hooks`)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..geometry import LowRankBlocks
from .base import UnsupportedModelError

logger = logging.getLogger(__name__)

#: the supported classes and the parameters their rules cover
STOCK: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("weight", "bias"), nn.Conv1d: ("weight", "bias"), nn.Conv2d: ("weight", "bias"),
    nn.Embedding: ("weight",), nn.LayerNorm: ("weight", "bias"),
}


def stock_type(module: nn.Module) -> type[nn.Module] | None:
    """The supported class whose ``forward`` ``module`` runs unchanged, or None."""
    for cls in STOCK:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return cls
    return None


class Rule(ABC):
    """Per-sample gradients of one module's subset parameters.

    Captured calls are laid out with a token axis: output gradients of ``n`` directions as
    ``[n, B, T, O]`` (:meth:`tokens`), calls of a reused module concatenated along ``T``.
    A parameter's rows are the first axis of its ``[rows, row_size]`` view;
    :attr:`row_ids` lists the rows that can be non-zero (None: all).
    """

    row_ids: Tensor | None = None

    def __init__(self, name: str, module: nn.Module, locals_: Sequence[str]) -> None:
        self.name = name
        self.module = module
        self.locals = list(locals_)
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []

    def record(self, inp: Tensor, out: Tensor) -> None:
        self.inputs.append(inp.detach())
        self.outputs.append(out)

    @abstractmethod
    def prepare(self, batch: int) -> None:
        """Lay the captured inputs out per token for a batch of ``batch`` samples (the
        captured inputs are dropped afterwards)."""

    def tokens(self, grads: list[Tensor]) -> Tensor:
        """Output gradients of the calls, each ``[n, B, *out]``, as ``[n, B, T, O]``."""
        n, b = grads[0].shape[:2]
        return _cat_tokens([g.reshape(n, b, -1, g.shape[-1]) for g in grads])

    @abstractmethod
    def shape(self, local: str) -> tuple[int, int]:
        """``(rows, row_size)`` of a parameter."""

    def row_chunks(self, local: str, per_row: int, budget: int) -> Iterator[tuple[int, int, slice | Tensor]]:
        """Positions ``lo:hi`` in :attr:`row_ids`, in steps of ``budget // per_row`` (at least
        one), each with the rows of the ``[rows, row_size]`` view it stands for."""
        ids = self.row_ids
        n_rows = self.shape(local)[0] if ids is None else ids.numel()
        step = max(1, budget // max(1, per_row))
        for lo in range(0, n_rows, step):
            hi = min(n_rows, lo + step)
            yield lo, hi, slice(lo, hi) if ids is None else ids[lo:hi]

    @abstractmethod
    def jacobian(self, local: str, g: Tensor, lo: int, hi: int) -> Tensor:
        """Per-sample gradients ``[B, n, hi - lo, row_size]`` of rows ``lo:hi`` (positions
        in :attr:`row_ids`) for output gradients ``g [n, B, T, O]``."""

    @abstractmethod
    def gradient(self, local: str, g: Tensor) -> Tensor:
        """Batch gradient ``[rows, row_size]`` for one direction, ``g [1, B, T, O]``."""

    # -- block-diagonal G: sum over directions and samples of weighted squared gradients --
    def pair_elements(self, n_total: int) -> int:
        """Elements per sample of a token-pair accumulator for ``n_total`` directions
        (:mod:`.hooks`), 0 where the module squares per-sample gradients instead."""
        return 0

    def fix_start(self, chunk: int, n_total: int, budget: int) -> None:
        """Prepare to accumulate ``n_total`` directions, ``chunk`` at a time."""
        self.budget, self.chunk = budget, chunk
        self.acc = {local: self.outputs[0].new_zeros(self.shape(local)) for local in self.locals}
        self.buf: Tensor | None = None

    def fix_put(self, i: int, g: Tensor) -> None:
        """Store the output gradients ``g [B, T, O]`` of direction ``i`` of the chunk (into
        one buffer reused by every chunk: fresh memory per pass cost more than the passes)."""
        if self.buf is None:
            self.buf = g.new_zeros(self.chunk, *g.shape)
        self.buf[i] = g

    def fix_add(self, w: Tensor) -> None:
        """Add ``sum_{n,k} w[n,k] (per-sample gradient)^2`` over the chunk's directions,
        ``w [chunk, B]`` (zero for slots the last chunk leaves unused)."""
        g = self.buf
        assert g is not None
        for local in self.locals:
            per_row = g.shape[0] * g.shape[1] * self.shape(local)[1]
            for lo, hi, rows in self.row_chunks(local, per_row, self.budget):
                self.acc[local][rows] += torch.einsum("nb,bnrs->rs", w, self.jacobian(local, g, lo, hi).square())

    def fix_result(self) -> dict[str, Tensor]:
        self.buf = None
        return self.acc

    # -- dense G (``pos`` / ``full``) --
    def pair_block_elements(self, n_total: int) -> int:
        """Elements per block of :meth:`dense_add`'s largest intermediate, 0 where the
        module's per-sample Jacobians are formed and contracted instead."""
        return 0

    def dense_add(self, g: Tensor, k: Tensor, l: Tensor, c: LowRankBlocks, out: dict[str, Tensor]) -> None:
        """Add ``sum_n diag(J_k^T C_n J_l)`` over blocks ``C_n`` between items ``k[n]`` and
        ``l[n]`` to each parameter's ``out[local] [rows, row_size]``, from the output
        gradients ``g [D, B, T, O]`` of the ``D`` unit directions (only where
        :meth:`pair_block_elements` is positive)."""
        raise NotImplementedError


def _cat_tokens(parts: list[Tensor]) -> Tensor:
    """Concatenate the calls of a module along the token axis (no copy for one call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _unfold(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """``[B, L, C_in * prod(kernel)]``: the input patches of each output position."""
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    if isinstance(conv, nn.Conv2d):
        kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    else:  # a 1-d convolution is a 2-d one of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, conv.kernel_size[0]), (1, conv.stride[0]), (1, conv.dilation[0])
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


class TokenLinearRule(Rule):
    """``nn.Linear`` (tokens: all axes between batch and features) and ``nn.Conv1d/2d``
    (tokens: output positions, per group). Inputs ``a [B, T, G, Qg]``, weight rows ``O``
    (``O = G * Og``, row ``o`` in group ``o // Og``)."""

    module: nn.Linear | nn.Conv1d | nn.Conv2d

    def prepare(self, batch: int) -> None:
        m = self.module
        parts = []
        for x in self.inputs:
            if x.ndim < 2 or x.shape[0] != batch:
                raise UnsupportedModelError(
                    f"module {self.name!r} got an input of shape {tuple(x.shape)}, not [B={batch}, ...]"
                )
            if isinstance(m, nn.Linear):
                parts.append(x.reshape(batch, -1, 1, x.shape[-1]))
            else:
                cols = _unfold(m, x)
                parts.append(cols.reshape(batch, cols.shape[1], m.groups, -1))
        self.a = torch.cat(parts, dim=1)
        self.out_features = self.module.weight.shape[0]
        self.group_rows = self.out_features // self.a.shape[2]

    def tokens(self, grads: list[Tensor]) -> Tensor:
        if isinstance(self.module, nn.Linear):
            return super().tokens(grads)
        n, b = grads[0].shape[:2]
        return _cat_tokens([g.reshape(n, b, g.shape[2], -1).transpose(2, 3) for g in grads])

    def shape(self, local: str) -> tuple[int, int]:
        return (self.out_features, self.a.shape[-1]) if local == "weight" else (self.out_features, 1)

    def jacobian(self, local: str, g: Tensor, lo: int, hi: int) -> Tensor:
        if local == "bias":
            return g[..., lo:hi].sum(2).permute(1, 0, 2).unsqueeze(-1)
        parts = []
        for grp in range(lo // self.group_rows, (hi - 1) // self.group_rows + 1):
            l, h = max(lo, grp * self.group_rows), min(hi, (grp + 1) * self.group_rows)
            parts.append(torch.einsum("nbtr,btq->bnrq", g[..., l:h], self.a[:, :, grp]))
        return torch.cat(parts, dim=2)

    def gradient(self, local: str, g: Tensor) -> Tensor:
        g = g[0]
        if local == "bias":
            return g.sum(dim=(0, 1)).unsqueeze(-1)
        rows = self.group_rows
        return torch.cat(
            [torch.einsum("btr,btq->rq", g[..., i * rows : (i + 1) * rows], a) for i, a in enumerate(self.a.unbind(2))]
        )

    # -- the token-pair route for block-diagonal G (:mod:`.hooks`) --
    def pair_elements(self, n_total: int) -> int:
        # token pairs cost B T^2 O (n + Q/2) multiply-adds, per-sample squares n B T O Q
        _, t, _, q = self.a.shape
        return self.out_features * t * t if t * (n_total + q / 2) < n_total * q else 0

    def pair_block_elements(self, n_total: int) -> int:
        _, t, _, q = self.a.shape
        linear = isinstance(self.module, nn.Linear)
        return self.out_features * t * max(n_total, q, t) if linear and self.pair_elements(n_total) else 0

    def dense_add(self, g: Tensor, k: Tensor, l: Tensor, c: LowRankBlocks, out: dict[str, Tensor]) -> None:
        """The token-pair route for dense G (an ``nn.Linear``): with
        ``M[n, o, t, s] = alpha_n sum_d g[d, k, t, o] g[d, l, s, o]
        + sum_r (x_rn . g[:, k, t, o]) (y_rn . g[:, l, s, o])``, the weight gets
        ``sum_{n,t,s} M a[k, t, q] a[l, s, q]`` and the bias ``sum_{n,t,s} M``: ``O(N T^2 O (D + Q))``
        where forming the Jacobians costs ``O(B D T O Q)`` and contracting them ``O(N D O Q)``."""
        gk, gl = g[:, k], g[:, l]
        alpha, x, y = c.alpha.to(g.dtype), c.x.to(g.dtype), c.y.to(g.dtype)
        m = torch.einsum("dnto,dnso->nots", gk, gl) * alpha[:, None, None, None]
        m += torch.einsum("rnto,rnso->nots", torch.einsum("rnd,dnto->rnto", x, gk), torch.einsum("rnd,dnso->rnso", y, gl))
        if "bias" in out:
            out["bias"] += m.sum(dim=(0, 2, 3)).unsqueeze(-1)
        if "weight" not in out:
            return
        a = self.a[:, :, 0]  # [B, T, Q]
        out["weight"] += torch.einsum("notq,ntq->oq", torch.einsum("nots,nsq->notq", m, a[l]), a[k])

    def fix_start(self, chunk: int, n_total: int, budget: int) -> None:
        bsz, t, _, q = self.a.shape
        o = self.out_features
        self.pairs = 0 < bsz * self.pair_elements(n_total) <= budget
        logger.debug(
            "hooks: %s uses %s (T=%d, O=%d, Q=%d, %d directions)",
            self.name, "token pairs" if self.pairs else "per-sample gradients", t, o, q, n_total,
        )
        if not self.pairs:
            super().fix_start(chunk, n_total, budget)
            return
        self.budget = budget
        self.n_acc = self.outputs[0].new_zeros(bsz, o, t, t)
        # the chunk's gradients as [B, O, chunk, T]: N[b, o] is then one batched product
        # over (b, o); writing each pass into this layout beat stacking and permuting
        self.rows = self.outputs[0].new_zeros(bsz, o, chunk, t)
        self.signed = torch.empty_like(self.rows)

    def fix_put(self, i: int, g: Tensor) -> None:
        if not self.pairs:
            super().fix_put(i, g)
            return
        self.rows[:, :, i, :] = g.transpose(1, 2)

    def fix_add(self, w: Tensor) -> None:
        if not self.pairs:
            super().fix_add(w)
            return
        # N[b, o] += sum_n w[n, b] g[n, b, :, o] g[n, b, :, o]^T
        bsz, o, chunk, t = self.rows.shape
        torch.mul(self.rows, w.T[:, None, :, None], out=self.signed)
        self.n_acc.view(bsz * o, t, t).baddbmm_(
            self.signed.view(bsz * o, chunk, t).transpose(1, 2), self.rows.view(bsz * o, chunk, t)
        )

    def fix_result(self) -> dict[str, Tensor]:
        if not self.pairs:
            return super().fix_result()
        n_acc, a = self.n_acc, self.a
        bsz, t, grp, q = a.shape
        out = {}
        if "bias" in self.locals:
            out["bias"] = n_acc.sum(dim=(0, 2, 3)).unsqueeze(-1)
        if "weight" in self.locals:
            iu, ju = torch.triu_indices(t, t, device=a.device)
            twice = torch.where(iu == ju, 1.0, 2.0).to(a.dtype)
            weight = torch.zeros(grp, self.group_rows, q, dtype=a.dtype, device=a.device)
            step = max(1, self.budget // max(1, iu.numel() * max(grp * q, self.out_features)))
            for lo in range(0, bsz, step):
                npair = (n_acc[lo : lo + step][:, :, iu, ju] * twice).view(-1, grp, self.group_rows, iu.numel())
                apair = a[lo : lo + step][:, iu] * a[lo : lo + step][:, ju]  # [b, pairs, G, Qg]
                weight += torch.einsum("bgop,bpgq->goq", npair, apair)
            out["weight"] = weight.reshape(self.out_features, q)
        del self.n_acc, self.rows, self.signed
        return out


class EmbeddingRule(Rule):
    """``nn.Embedding``: per-sample gradients kept as ``(sample, row)`` entries."""

    module: nn.Embedding

    def prepare(self, batch: int) -> None:
        idx = torch.cat([x.reshape(batch, -1) for x in self.inputs], dim=1)
        vocab = self.module.num_embeddings
        pad = self.module.padding_idx
        keep = torch.ones_like(idx, dtype=torch.bool) if pad is None else idx.ne(pad)
        sample = torch.arange(batch, device=idx.device)[:, None].expand_as(idx)
        self.token_pos = keep.reshape(-1).nonzero().squeeze(1)  # kept tokens in [B*T]
        keys, self.entry_of = torch.unique((sample * vocab + idx)[keep], return_inverse=True)
        self.sample_of, self.vocab_of = keys // vocab, keys % vocab
        self.row_ids, self.id_pos = torch.unique(self.vocab_of, return_inverse=True)

    def shape(self, local: str) -> tuple[int, int]:
        return self.module.num_embeddings, self.module.embedding_dim

    def _entries(self, g: Tensor) -> Tensor:
        """``[n, entries, E]``: the per-sample gradient of each (sample, row) entry."""
        n, b, t, e = g.shape
        flat = g.reshape(n, b * t, e)[:, self.token_pos]
        out = torch.zeros(n, self.sample_of.numel(), e, dtype=g.dtype, device=g.device)
        return out.index_add_(1, self.entry_of, flat)

    def jacobian(self, local: str, g: Tensor, lo: int, hi: int) -> Tensor:
        entries = self._entries(g)
        sel = ((self.id_pos >= lo) & (self.id_pos < hi)).nonzero().squeeze(1)
        n, bsz, e = g.shape[0], g.shape[1], g.shape[-1]
        jac = torch.zeros(bsz * (hi - lo), n, e, dtype=g.dtype, device=g.device)
        jac.index_add_(0, self.sample_of[sel] * (hi - lo) + self.id_pos[sel] - lo, entries[:, sel].transpose(0, 1))
        return jac.view(bsz, hi - lo, n, e).transpose(1, 2)

    def gradient(self, local: str, g: Tensor) -> Tensor:
        entries = self._entries(g)[0]
        return torch.zeros(self.shape(local), dtype=g.dtype, device=g.device).index_add_(0, self.vocab_of, entries)

    def fix_add(self, w: Tensor) -> None:
        assert self.buf is not None
        weighted = (w[:, self.sample_of, None] * self._entries(self.buf).square()).sum(0)
        self.acc["weight"].index_add_(0, self.vocab_of, weighted)


class LayerNormRule(Rule):
    """``nn.LayerNorm``: ``y = xhat * w + b`` elementwise over ``normalized_shape``."""

    module: nn.LayerNorm

    def prepare(self, batch: int) -> None:
        m = self.module
        self.xhat = torch.cat(
            [F.layer_norm(x, m.normalized_shape, eps=m.eps).reshape(batch, -1, self.width) for x in self.inputs], dim=1
        )

    @property
    def width(self) -> int:
        return self.module.weight.numel() if self.module.weight is not None else self.module.bias.numel()

    def tokens(self, grads: list[Tensor]) -> Tensor:
        n, b = grads[0].shape[:2]
        return _cat_tokens([g.reshape(n, b, -1, self.width) for g in grads])

    def shape(self, local: str) -> tuple[int, int]:
        return (self.width, 1)

    def jacobian(self, local: str, g: Tensor, lo: int, hi: int) -> Tensor:
        g = g[..., lo:hi]
        per = torch.einsum("nbte,bte->bne", g, self.xhat[..., lo:hi]) if local == "weight" else g.sum(2).transpose(0, 1)
        return per.unsqueeze(-1)

    def gradient(self, local: str, g: Tensor) -> Tensor:
        return self.jacobian(local, g, 0, self.width).sum(dim=(0, 1))


def make_rule(name: str, module: nn.Module, locals_: Sequence[str]) -> Rule:
    """The rule for a module that :func:`._hooked_forward.owners` accepted."""
    cls = stock_type(module)
    if cls is nn.Embedding:
        return EmbeddingRule(name, module, locals_)
    if cls is nn.LayerNorm:
        return LayerNormRule(name, module, locals_)
    return TokenLinearRule(name, module, locals_)
