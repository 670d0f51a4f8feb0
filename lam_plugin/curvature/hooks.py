"""Curvature from module hooks and batched backward passes: no tracing, no vmap.

Hugging Face transformers have data-dependent Python control flow: ``torch.fx`` cannot
trace them (BackPACK) and ``torch.func.vmap`` cannot run them. Reverse-mode autograd
can, and per-sample gradients of the common layers follow from what a forward hook sees
(the layer's input) and from the gradient with respect to the layer's output, the way
Opacus's grad samplers form them. The rules are written here because Opacus is not a
dependency and its samplers serve one backward pass (one direction per sample) with
``[B, *shape]`` per-sample gradients kept on every parameter, where this backend needs
``D`` directions reduced to squares or contracted with G, mostly without ever forming a
per-sample gradient (the token-pair route below).

**Forward.** The model runs once through ``torch.func.functional_call`` with the subset's
parameters replaced by detached leaves that require grad and every other parameter by
a detached alias, so the recorded graph starts at the subset and the user's parameters,
their ``.grad`` and their ``requires_grad`` flags are never touched. Forward hooks on the
modules owning subset parameters (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``,
``nn.Embedding``, ``nn.LayerNorm``, with their stock ``forward``) keep each call's input
and output; the output handed on to the network is a clone, so a later in-place
operation (``ReLU(inplace=True)``, ``x += residual``) cannot change the tensor whose
gradient is taken. The hooks are removed as soon as the forward returns.

**Backward.** In eval mode the samples of a batch do not interact, so one pass
``torch.autograd.grad(emb, outputs, grad_outputs=U)`` with ``U [B, D]`` gives, for every
sample ``k``, the gradient of ``u_k . emb_k`` with respect to sample ``k``'s layer
outputs: ``B`` per-sample gradients, each for its own direction ``u_k``, in one pass.
Autograd walks only the graph between the embedding and the hooked outputs.

**Per-sample gradients** (``a`` the captured input, ``g`` the output gradient, both with a
token axis ``t``: sequence positions, or spatial positions of a convolution, or ``1``):

* Linear ``[O, Q]``: ``dW_k = sum_t g[k,t,:] a[k,t,:]^T``, ``db_k = sum_t g[k,t,:]``.
* Conv (``groups`` ``G``): the same with ``a`` the unfolded input patches of each group
  (``[B, L, G, C_in/G * prod(kernel)]``, padding applied first), ``t`` over the ``L``
  output positions; row ``o`` of the weight uses its group's patches.
* Embedding ``[V, E]``: ``dW_k[v] = sum_{t: idx[k,t]=v} g[k,t,:]`` (the padding index
  gets no gradient, as in ``nn.Embedding``): sparse, kept as ``(sample, row)`` entries.
* LayerNorm: ``dw_k = sum_t g[k,t,:] * xhat[k,t,:]`` with ``xhat`` the normalised input,
  ``db_k = sum_t g[k,t,:]``.

**Block-diagonal G** (``approx="fix"``). Every block is a multiple of the identity
plus a low-rank term (``OutputHessian.self_blocks``), ``G_k = alpha_k I + Q_k C_k Q_k^T``
with ``Q_k [D, r]`` orthonormal (``r <= 6``; :func:`block_factors`) and
``C_k = V_k diag(mu_k) V_k^T``, so

    diag(J_k^T G_k J_k) = sum_d s(alpha_k) (J_k^T sqrt|alpha_k| e_d)^2 + sum_i s(mu_ki) (J_k^T sqrt|mu_ki| Q_k v_ki)^2

(``s`` the sign): ``D + r`` backward passes, each seeding every sample with its own
direction ``w_kn``, and squares of per-sample gradients weighted by the signs ``s_kn``;
no ``[D, D]`` block is formed or decomposed. For a Linear or Conv with ``T`` tokens the
squares need not be formed per pass (``g_n`` the output gradients of pass ``n``):

    N_k[o, t, t'] = sum_n s_kn g_n[k,t,o] g_n[k,t',o]                   [B, O, T, T]
    diag_W[o, q]  = sum_k sum_{t,t'} N_k[o, t, t'] a[k,t,q] a[k,t',q]   (t <= t', twice off the diagonal)
    diag_b[o]     = sum_k sum_{t,t'} N_k[o, t, t']

which costs ``B T^2 O (D + Q/2)`` multiply-adds against ``D B T O Q`` for squaring
per-sample gradients; the cheaper of the two is used per layer (and the per-sample route
wherever ``N`` would not fit in ``max_elements``). For the last Linear of
all-MiniLM-L6-v2 (``T = 12``, ``O = 384``, ``Q = 1536``, ``D = 384``, ``B = 64``) that is
4.3 G against 174 G. For ``T = 1`` (an MLP) it is ``diag_W = sum_k N_k a_k^2``.

**Dense G** (``pos`` / ``full``, ``[B*D, B*D]``). Pair terms couple the Jacobians of two
samples, so the per-sample Jacobians ``J [B, D, P]`` are formed exactly: ``D`` passes
seeded with the unit vectors ``e_d`` for all samples give every layer's output
gradients for every output dimension; per layer and parameter they are turned into
Jacobian chunks ``[B, D, rows * row_size]`` and contracted with
``OutputHessian.contract``. Memory: the stored output gradients (``D`` times the hooked
outputs; modules are processed in groups that fit ``max_elements``, each group costing
its own ``D`` passes) and one Jacobian chunk (``<= max_elements``). For block-diagonal
G, the directions run in chunks whose output gradients fit ``max_elements``, written
into one buffer per module that every chunk reuses.

A module whose output has batch size 1 in a batch of ``B`` (BERT's position embeddings,
computed once for ``position_ids [1, T]`` and added to every sample) gets ``B`` copies
of its output, so that each sample's gradient is its own; the embedding is then
checked against the model's plain forward.

Every batch also runs a check that costs two backward passes: a direction on one sample
must leave the other samples' hooked outputs without gradient (the samples do not
interact), and for a random direction the gradient that autograd gives each subset
parameter must equal the sum over samples of the per-sample gradients above. The second
fails when a parameter is also used outside its module's ``forward`` (functionally, as
``nn.MultiheadAttention`` uses ``out_proj.weight``); a hooked module that never ran
fails too (``UnsupportedModelError``, naming it). A parameter whose module runs but
whose output the embedding does not use (a BERT pooler under mean pooling) gets zero
curvature.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calling import Batch, ModelCall
from ..geometry import LowRankBlocks, OutputHessian
from .base import CurvatureBackend, HessianFn, UnsupportedModelError, check_finite

logger = logging.getLogger(__name__)

#: elements of the largest intermediate tensor (about 128 MB in float32)
MAX_ELEMENTS = 2**25
#: relative tolerance of the per-batch gradient check
CHECK_RTOL = 1e-3
#: most directions per chunk of backward passes
CHUNK = 8

_STOCK = {nn.Linear: ("weight", "bias"), nn.Conv1d: ("weight", "bias"), nn.Conv2d: ("weight", "bias"),
          nn.Embedding: ("weight",), nn.LayerNorm: ("weight", "bias")}


# --------------------------------------------------------------------------------------------
# Which parameters the hooks can cover
# --------------------------------------------------------------------------------------------
def _stock_type(module: nn.Module) -> type | None:
    """The supported class whose ``forward`` ``module`` runs unchanged, or None."""
    for cls in _STOCK:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return cls
    return None


def _module_reason(name: str, module: nn.Module, locals_: Sequence[str]) -> str | None:
    cls = _stock_type(module)
    if cls is None:
        kinds = ", ".join(c.__name__ for c in _STOCK)
        return (
            f"module {name!r} ({type(module).__name__}) holds subset parameters and is not one of "
            f"{kinds} with its stock forward"
        )
    extra = [n for n in locals_ if n not in _STOCK[cls]]
    if extra:
        return f"module {name!r} ({type(module).__name__}) has parameters {extra} outside its forward's rule"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
        return f"module {name!r} (Embedding) uses max_norm or scale_grad_by_freq"
    return None


def _owners(model: nn.Module, param_names: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """``module name -> [(parameter name, local name)]`` for the subset, or raise
    ``UnsupportedModelError`` naming what the hooks cannot cover."""
    params = dict(model.named_parameters())
    holders: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(id(module))
    modules = dict(model.named_modules())
    owners: dict[str, list[tuple[str, str]]] = {}
    for name in param_names:
        if name not in params:
            raise ValueError(f"{name!r} is not a parameter of the model")
        mod_name, _, local = name.rpartition(".")
        if len(holders.get(id(params[name]), ())) > 1:
            raise UnsupportedModelError(f"parameter {name!r} is shared by several modules (tied weights)")
        owners.setdefault(mod_name, []).append((name, local))
    for mod_name, entries in owners.items():
        reason = _module_reason(mod_name or "<model>", modules[mod_name], [local for _, local in entries])
        if reason:
            raise UnsupportedModelError(reason)
    return owners


def hooks_support(model: nn.Module, param_names: Sequence[str]) -> str | None:
    """None if the hooks backend covers ``param_names`` of ``model``, else the reason.

    Static: a parameter also used outside its module's forward is found only when a
    batch runs (the backend's gradient check).
    """
    try:
        _owners(model, param_names)
    except UnsupportedModelError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------------
# Per-module rules: per-sample gradients from captured inputs and output gradients
# --------------------------------------------------------------------------------------------
class _Rule(ABC):
    """Per-sample gradients of one module's subset parameters.

    Captured calls are laid out with a token axis: output gradients of ``n`` directions as
    ``[n, B, T, O]`` (:meth:`tokens`), calls of a reused module concatenated along ``T``.
    A parameter's rows are the first axis of its ``[rows, row_size]`` view;
    :meth:`row_ids` lists the rows that can be non-zero (None: all).
    """

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
        """Lay the captured inputs out per token for a batch of ``batch`` samples."""

    @abstractmethod
    def tokens(self, grads: list[Tensor]) -> Tensor:
        """Output gradients of the calls, each ``[n, B, *out]``, as ``[n, B, T, O]``."""

    @abstractmethod
    def shape(self, local: str) -> tuple[int, int]:
        """``(rows, row_size)`` of a parameter."""

    def row_ids(self, local: str) -> Tensor | None:
        return None

    def n_rows(self, local: str) -> int:
        ids = self.row_ids(local)
        return self.shape(local)[0] if ids is None else ids.numel()

    @abstractmethod
    def jacobian(self, local: str, g: Tensor, lo: int, hi: int) -> Tensor:
        """Per-sample gradients ``[B, n, hi - lo, row_size]`` of rows ``lo:hi`` (positions
        in :meth:`row_ids`) for output gradients ``g [n, B, T, O]``."""

    @abstractmethod
    def gradient(self, local: str, g: Tensor) -> Tensor:
        """Batch gradient ``[rows, row_size]`` for one direction, ``g [1, B, T, O]``."""

    # -- block-diagonal G: sum over directions and samples of weighted squared gradients --
    def pair_elements(self, n_total: int) -> int:
        """Elements per sample of a token-pair accumulator for ``n_total`` directions
        (module docstring), 0 where the module squares per-sample gradients instead."""
        return 0

    def fix_start(self, chunk: int, n_total: int, budget: int) -> None:
        """Prepare to accumulate ``n_total`` directions, ``chunk`` at a time."""
        self.budget, self.chunk = budget, chunk
        self.acc = {
            local: torch.zeros(self.shape(local), dtype=self.dtype, device=self.device) for local in self.locals
        }
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
            rows, size = self.n_rows(local), self.shape(local)[1]
            ids = self.row_ids(local)
            step = max(1, self.budget // max(1, g.shape[0] * g.shape[1] * size))
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)
                part = torch.einsum("nb,bnrs->rs", w, self.jacobian(local, g, lo, hi).square())
                if ids is None:
                    self.acc[local][lo:hi] += part
                else:
                    self.acc[local].index_add_(0, ids[lo:hi], part)

    def fix_result(self) -> dict[str, Tensor]:
        self.buf = None
        return self.acc

    @property
    def dtype(self) -> torch.dtype:
        return self.outputs[0].dtype

    @property
    def device(self) -> torch.device:
        return self.outputs[0].device


def _cat_tokens(parts: list[Tensor]) -> Tensor:
    """Concatenate the calls of a module along the token axis (no copy for one call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _unfold(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """``[B, L, C_in * prod(kernel)]``: the input patches of each output position."""
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    if isinstance(conv, nn.Conv1d):  # a 1-d convolution is a 2-d one of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, conv.kernel_size[0]), (1, conv.stride[0]), (1, conv.dilation[0])
    else:
        kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


class _TokenLinearRule(_Rule):
    """``nn.Linear`` (tokens: all axes between batch and features) and ``nn.Conv1d/2d``
    (tokens: output positions, per group). Inputs ``a [B, T, G, Qg]``, weight rows ``O``
    (``O = G * Og``, row ``o`` in group ``o // Og``)."""

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
                cols = _unfold(m, x)  # type: ignore[arg-type]
                parts.append(cols.reshape(batch, cols.shape[1], m.groups, -1))
        self.a = torch.cat(parts, dim=1)
        self.groups = self.a.shape[2]
        self.out_features = self.module.weight.shape[0]
        self.group_rows = self.out_features // self.groups
        self.inputs = []

    def tokens(self, grads: list[Tensor]) -> Tensor:
        n, b = grads[0].shape[:2]
        if isinstance(self.module, nn.Linear):
            return _cat_tokens([g.reshape(n, b, -1, g.shape[-1]) for g in grads])
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

    # -- the token-pair route for block-diagonal G (module docstring) --
    def pair_elements(self, n_total: int) -> int:
        # token pairs cost B T^2 O (n + Q/2) multiply-adds, per-sample squares n B T O Q
        _, t, _, q = self.a.shape
        return self.out_features * t * t if t * (n_total + q / 2) < n_total * q else 0

    def fix_start(self, chunk: int, n_total: int, budget: int) -> None:
        bsz, t, _, q = self.a.shape
        o = self.out_features
        per_sample = self.pair_elements(n_total)
        self.pairs = 0 < bsz * per_sample <= budget
        logger.debug(
            "hooks: %s uses %s (T=%d, O=%d, Q=%d, %d directions)",
            self.name, "token pairs" if self.pairs else "per-sample gradients", t, o, q, n_total,
        )
        if not self.pairs:
            super().fix_start(chunk, n_total, budget)
            return
        self.budget = budget
        self.n_acc = torch.zeros(bsz, o, t, t, dtype=self.dtype, device=self.device)
        # the chunk's gradients as [B, O, chunk, T]: N[b, o] is then one batched product
        # over (b, o); writing each pass into this layout beat stacking and permuting
        self.rows = torch.zeros(bsz, o, chunk, t, dtype=self.dtype, device=self.device)
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
            return self.acc
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


class _EmbeddingRule(_Rule):
    """``nn.Embedding``: per-sample gradients kept as ``(sample, row)`` entries."""

    def prepare(self, batch: int) -> None:
        idx = torch.cat([x.reshape(batch, -1) for x in self.inputs], dim=1)
        vocab = self.module.num_embeddings
        keep = torch.ones_like(idx, dtype=torch.bool)
        if self.module.padding_idx is not None:
            keep = idx != self.module.padding_idx
        sample = torch.arange(batch, device=idx.device)[:, None].expand_as(idx)
        self.token_pos = keep.reshape(-1).nonzero().squeeze(1)  # kept tokens in [B*T]
        keys, self.entry_of = torch.unique((sample * vocab + idx)[keep], return_inverse=True)
        self.sample_of, self.vocab_of = keys // vocab, keys % vocab
        self.ids, self.id_pos = torch.unique(self.vocab_of, return_inverse=True)
        self.inputs = []

    def tokens(self, grads: list[Tensor]) -> Tensor:
        n, b = grads[0].shape[:2]
        return _cat_tokens([g.reshape(n, b, -1, g.shape[-1]) for g in grads])

    def shape(self, local: str) -> tuple[int, int]:
        return tuple(self.module.weight.shape)  # type: ignore[return-value]

    def row_ids(self, local: str) -> Tensor:
        return self.ids

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


class _LayerNormRule(_Rule):
    """``nn.LayerNorm``: ``y = xhat * w + b`` elementwise over ``normalized_shape``."""

    def prepare(self, batch: int) -> None:
        m = self.module
        self.xhat = torch.cat(
            [F.layer_norm(x, m.normalized_shape, eps=m.eps).reshape(batch, -1, self.width) for x in self.inputs], dim=1
        )
        self.inputs = []

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


def _rule(name: str, module: nn.Module, locals_: Sequence[str]) -> _Rule:
    cls = _stock_type(module)
    if cls is nn.Embedding:
        return _EmbeddingRule(name, module, locals_)
    if cls is nn.LayerNorm:
        return _LayerNormRule(name, module, locals_)
    return _TokenLinearRule(name, module, locals_)


# --------------------------------------------------------------------------------------------
# One hooked forward pass and the backward passes on it
# --------------------------------------------------------------------------------------------
def leaf_forward(
    model: nn.Module, call: ModelCall, param_names: Sequence[str], x: Batch
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(embedding [B, D], leaves)``: one forward with the subset's parameters replaced by
    detached leaves that require grad (``leaves``, by name) and every other parameter by
    a detached alias. A dict batch is passed as a shallow copy (sentence-transformers
    modules write their outputs into the dict they are given)."""
    subset = set(param_names)
    params = {n: p.detach().requires_grad_(n in subset) for n, p in model.named_parameters()}
    inputs = dict(x) if isinstance(x, Mapping) else x
    with torch.enable_grad():
        emb = call.functional(model, params, inputs)
    return emb, {n: params[n] for n in param_names}


@dataclass
class HookedForward:
    """One forward pass with the subset's modules hooked (module docstring).

    Attributes:
        embedding: ``[B, D]``, with its graph.
        leaves: the subset's parameters as graph leaves, by name.
        rules: per hooked module (by name), its captured calls.
        where: parameter name -> ``(module name, local name)``.
        budget: elements of the largest intermediate tensor.
    """

    embedding: Tensor
    leaves: dict[str, Tensor]
    rules: dict[str, _Rule]
    where: dict[str, tuple[str, str]]
    budget: int = MAX_ELEMENTS

    def _passes(self, rules: Sequence[_Rule], directions: Tensor) -> Iterator[dict[str, Tensor]]:
        """For each direction ``u [B, D]`` of ``directions [n, B, D]``, one backward pass
        (retaining the graph): the output gradients ``{module: [B, T, O]}``."""
        outs = [o for r in rules for o in r.outputs]
        for u in directions:
            got = torch.autograd.grad(self.embedding, outs, grad_outputs=u, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outs, got)]
            result, i = {}, 0
            for r in rules:
                result[r.name] = r.tokens([g.unsqueeze(0) for g in grads[i : i + len(r.outputs)]])[0]
                i += len(r.outputs)
            yield result

    def _grads(self, rules: Sequence[_Rule], directions: Tensor) -> dict[str, Tensor]:
        """Output gradients ``{module: [n, B, T, O]}`` for ``directions [n, B, D]``."""
        per_pass = list(self._passes(rules, directions))
        return {r.name: torch.stack([p[r.name] for p in per_pass]) for r in rules}

    def check(self) -> None:
        """Two backward passes that check the per-sample rules on this batch.

        * For a random direction on sample 0 only, no other sample's hooked outputs get a
          gradient: the samples are independent (eval mode, outputs broadcast over the
          batch only by adding).
        * For a random direction on all samples, autograd's gradient of every subset
          parameter is the sum of its per-sample gradients: no parameter is used outside
          its module's forward.

        Raises ``UnsupportedModelError`` naming the module or parameter otherwise.
        """
        emb = self.embedding
        u = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0), dtype=emb.dtype).to(emb.device)
        rules = list(self.rules.values())
        if emb.shape[0] > 1:
            first = torch.zeros_like(u)
            first[0] = u[0]
            grads = self._grads(rules, first[None])
            coupled = [r.name for r in rules if bool(grads[r.name][:, 1:].ne(0).any())]
            if coupled:
                raise UnsupportedModelError(
                    f"the outputs of modules {coupled} of one sample change the embedding of another: "
                    "per-sample gradients need samples that do not interact (eval mode, no batch statistics)"
                )
        names = list(self.where)
        leaves = [self.leaves[n] for n in names]
        autograd = torch.autograd.grad(emb, leaves, grad_outputs=u, retain_graph=True, allow_unused=True)
        grads = self._grads(rules, u[None])
        pairs = []
        for name, auto in zip(names, autograd):
            mod, local = self.where[name]
            ours = self.rules[mod].gradient(local, grads[mod]).reshape(-1)
            pairs.append((name, mod, ours, torch.zeros_like(ours) if auto is None else auto.reshape(-1)))
        # gradients that vanish in exact arithmetic (a key bias under softmax) are rounding
        # noise on both sides: compare them on the scale of the whole subset's gradient
        floor = torch.finfo(emb.dtype).eps ** 0.5 * float(torch.cat([a for *_, a in pairs]).norm())
        for name, mod, ours, auto in pairs:
            err = float((ours - auto).norm())
            if err > CHECK_RTOL * float(auto.norm()) + floor:
                raise UnsupportedModelError(
                    f"the gradient of {name!r} is not what module {mod!r} computes from its own inputs "
                    f"(relative difference {err / max(float(auto.norm()), 1e-30):.2g}): the parameter is also used "
                    "outside that module's forward, so the hooks backend cannot cover it"
                )

    def fix_diagonal(self, directions: Tensor, weights: Tensor) -> dict[str, Tensor]:
        """``{parameter: sum_{n,k} weights[n,k] (J_k^T directions[n,k])^2}``, each of the
        parameter's shape, for ``directions [n, B, D]`` and ``weights [n, B]``."""
        rules = list(self.rules.values())
        n_total, bsz = directions.shape[:2]
        per_direction = sum(o.numel() for r in rules for o in r.outputs)
        chunk = max(1, min(n_total, CHUNK, self.budget // max(1, per_direction)))
        for r in rules:
            r.fix_start(chunk, n_total, self.budget)
        for lo in range(0, n_total, chunk):
            for i, grads in enumerate(self._passes(rules, directions[lo : lo + chunk])):
                for r in rules:
                    r.fix_put(i, grads[r.name])
            w = weights.new_zeros(chunk, bsz)
            w[: min(chunk, n_total - lo)] = weights[lo : lo + chunk]
            for r in rules:
                r.fix_add(w)
        results = {r.name: r.fix_result() for r in rules}
        return {name: results[mod][local] for name, (mod, local) in self.where.items()}

    def fix_groups(self, n_total: int, lengths: Tensor | None = None) -> list[tuple[Tensor, int | None]]:
        """Groups of samples for :meth:`fix_diagonal` with ``n_total`` directions, as
        ``(sample indices, tokens to keep or None)``; a block-diagonal G adds up sample by
        sample, so groups can run apart, each with a forward pass of its own.

        Without ``lengths``: the whole batch, or equal groups small enough that every
        token-pair accumulator fits the budget. With ``lengths [B]`` (the tokens each sample
        uses of a right-padded batch): the samples by decreasing length, each group cut to
        its longest sample and as large as the budget allows at that length, so the
        ``T^2`` of the token pairs is paid per length, not at the batch's padded length.
        A sample that does not fit alone squares per-sample gradients instead.
        """
        bsz = self.embedding.shape[0]
        everyone = torch.arange(bsz)
        per_sample = max((r.pair_elements(n_total) for r in self.rules.values()), default=0)
        if lengths is None:
            fits = self.budget // per_sample if per_sample else bsz
            if fits == 0 or fits >= bsz:
                return [(everyone, None)]
            size = math.ceil(bsz / math.ceil(bsz / fits))
            return [(everyone[lo : lo + size], None) for lo in range(0, bsz, size)]
        padded = int(lengths.max())
        order = torch.argsort(lengths.cpu(), descending=True, stable=True)
        groups: list[tuple[Tensor, int | None]] = []
        lo = 0
        while lo < bsz:
            longest = max(1, int(lengths[order[lo]]))
            need = per_sample * longest**2 // max(1, self.rules_tokens()) ** 2
            size = max(1, self.budget // need) if need else bsz
            groups.append((order[lo : lo + size], longest))
            lo += size
        if len(groups) == 1 and groups[0][1] == padded == self.rules_tokens():
            return [(everyone, None)]
        return groups

    def rules_tokens(self) -> int:
        """The token count of this batch's hooked layers (the longest, where they differ)."""
        return max((int(r.a.shape[1]) for r in self.rules.values() if isinstance(r, _TokenLinearRule)), default=1)

    def dense_diagonal(self, g: OutputHessian) -> dict[str, Tensor]:
        """``{parameter: diag(J^T G J)}`` for a dense ``G`` (module docstring)."""
        emb = self.embedding
        bsz, dim = emb.shape
        units = torch.eye(dim, dtype=emb.dtype, device=emb.device)[:, None, :].expand(dim, bsz, dim)
        out: dict[tuple[str, str], Tensor] = {}
        for group in self._groups(dim):
            grads = self._grads(group, units)
            for r in group:
                for local in r.locals:
                    out[r.name, local] = self._contract(r, local, grads[r.name], g)
        return {name: out[where] for name, where in self.where.items()}

    def _groups(self, dim: int) -> Iterator[list[_Rule]]:
        """Modules in groups whose output gradients for ``dim`` directions fit the budget."""
        group: list[_Rule] = []
        size = 0
        for r in self.rules.values():
            need = dim * sum(o.numel() for o in r.outputs)
            if group and size + need > self.budget:
                yield group
                group, size = [], 0
            group.append(r)
            size += need
        if group:
            yield group

    def _contract(self, r: _Rule, local: str, grads: Tensor, g: OutputHessian) -> Tensor:
        rows, size = r.shape(local)
        diag = torch.zeros(rows, size, dtype=grads.dtype, device=grads.device)
        ids, n_rows = r.row_ids(local), r.n_rows(local)
        bsz, dim = self.embedding.shape
        step = max(1, self.budget // max(1, bsz * dim * size))
        for lo in range(0, n_rows, step):
            hi = min(n_rows, lo + step)
            part = g.contract(r.jacobian(local, grads, lo, hi).reshape(bsz, dim, -1)).view(hi - lo, size)
            if ids is None:
                diag[lo:hi] = part
            else:
                diag[ids[lo:hi]] = part
        return diag


def _batch_size(x: Batch) -> int:
    """Leading size of a tensor batch, or of the first tensor of a dict batch (0 if none)."""
    if isinstance(x, Tensor):
        return x.shape[0] if x.ndim else 0
    first = next((v for v in x.values() if isinstance(v, Tensor) and v.ndim), None)
    return 0 if first is None else first.shape[0]


def _check_broadcast(model: nn.Module, call: ModelCall, x: Batch, emb: Tensor, names: list[str]) -> None:
    """The embedding with per-sample copies of broadcast outputs must equal the model's own."""
    with torch.no_grad():
        plain = call.embed(model, dict(x) if isinstance(x, Mapping) else x)
    scale = float(plain.abs().max()) if plain.numel() else 0.0
    if plain.shape != emb.shape or not torch.allclose(emb.detach(), plain, rtol=1e-4, atol=1e-5 * scale):
        raise UnsupportedModelError(
            f"module {sorted(set(names))} returns one output for the whole batch, and the model does not "
            "broadcast it over the samples; per-sample gradients are undefined there"
        )


def hooked_forward(
    model: nn.Module, call: ModelCall, param_names: Sequence[str], x: Batch, budget: int = MAX_ELEMENTS
) -> HookedForward:
    """Run the hooked forward pass on ``x``; the hooks are gone when it returns."""
    owners = _owners(model, param_names)
    modules = dict(model.named_modules())
    rules = {name: _rule(name, modules[name], [local for _, local in entries]) for name, entries in owners.items()}

    bsz = _batch_size(x)
    broadcast: list[str] = []

    def hook(rule: _Rule):
        def capture(module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
            inp = args[0] if args else kwargs["input"]
            if out.ndim >= 2 and out.shape[0] == 1 and bsz > 1:
                # one output for the whole batch (BERT's position embeddings of position_ids
                # [1, T]): give every sample its own copy, so that its gradient is per sample
                broadcast.append(rule.name)
                inp, out = inp.expand(bsz, *inp.shape[1:]), out.expand(bsz, *out.shape[1:])
            rule.record(inp, out)
            return out.clone()

        return capture

    handles = [modules[name].register_forward_hook(hook(rule), with_kwargs=True) for name, rule in rules.items()]
    try:
        emb, leaves = leaf_forward(model, call, param_names, x)
    finally:
        for h in handles:
            h.remove()
    if broadcast:
        _check_broadcast(model, call, x, emb, broadcast)
    silent = [f"{name!r} ({type(r.module).__name__})" for name, r in rules.items() if not r.outputs]
    if silent:
        raise UnsupportedModelError(
            f"module {', '.join(silent)} holds subset parameters but did not run in the forward pass "
            "(a parent module may use its parameters functionally, as nn.MultiheadAttention does)"
        )
    for r in rules.values():
        r.prepare(emb.shape[0])
    where = {name: (mod, local) for mod, entries in owners.items() for name, local in entries}
    return HookedForward(emb, leaves, rules, where, budget)


def block_factors(blocks: LowRankBlocks) -> tuple[Tensor, Tensor, Tensor]:
    """``(alpha [B], basis [B, D, r], core [B, r, r])`` with
    ``G_k = alpha_k I + basis_k core_k basis_k^T`` (``basis`` orthonormal, ``core`` symmetric)
    for symmetric blocks ``G_k = alpha_k I + sum_t x_t y_t^T`` with a few terms
    (``OutputHessian.self_blocks``).

    The span of the ``2T`` vectors ``x_t, y_t`` holds the low-rank part, so their QR gives a
    basis for it and ``core = sum_t (basis^T x_t)(basis^T y_t)^T``: no ``[D, D]`` block is
    formed or decomposed.
    """
    x, y = blocks.x.permute(1, 2, 0), blocks.y.permute(1, 2, 0)  # [B, D, T]
    basis = torch.linalg.qr(torch.cat([x, y], dim=2)).Q
    core = (basis.mT @ x) @ (basis.mT @ y).mT
    return blocks.alpha, basis, (core + core.mT) / 2


def fix_directions(g: OutputHessian) -> tuple[Tensor, Tensor]:
    """``(directions [n, B, D], signs [n, B])`` with ``G_k = sum_r signs[r,k] w_rk w_rk^T``
    for a block-diagonal G (:func:`block_factors`): the ``D`` unit vectors scaled by
    ``sqrt|alpha_k|``, and the eigenvectors ``basis_k v`` of ``core_k`` scaled by
    ``sqrt|mu|``. A direction whose scale is at rounding level in every sample is dropped."""
    alpha, basis, core = block_factors(g.self_blocks())
    mu, vec = torch.linalg.eigh(core)
    bsz, dim = basis.shape[:2]
    units = torch.eye(dim, dtype=alpha.dtype, device=alpha.device)[:, None, :] * alpha.abs().sqrt()[None, :, None]
    low = ((basis @ vec) * mu.abs().sqrt()[:, None, :]).permute(2, 0, 1)
    directions = torch.cat([units, low])
    signs = torch.cat([alpha.sign()[None].expand(dim, bsz), mu.sign().T])
    scale = torch.cat([alpha.abs()[None].expand(dim, bsz), mu.abs().T])
    keep = (scale > dim * torch.finfo(scale.dtype).eps * scale.max()).any(dim=1)
    return directions[keep], signs[keep]


class HooksBackend(CurvatureBackend):
    """Exact contrastive GGN diagonal from module hooks (module docstring).

    Args:
        max_elements: elements of the largest intermediate tensor (output gradients of a
            chunk of directions, a Jacobian chunk, the token-pair accumulator).
    """

    name = "hooks"

    def __init__(
        self, model: nn.Module, call: ModelCall, param_names: Sequence[str], max_elements: int = MAX_ELEMENTS
    ) -> None:
        super().__init__(model, call, param_names)
        _owners(model, param_names)
        self.max_elements = max_elements
        self.trim_padding = True

    def batch(self, x: Batch, hessian_fn: HessianFn) -> tuple[Tensor, Tensor]:
        fwd = hooked_forward(self.model, self.call, self.param_names, x, self.max_elements)
        out = fwd.embedding.detach()
        g = hessian_fn(out)
        if not fwd.embedding.requires_grad:  # no subset parameter reaches the embedding
            diags = {n: torch.zeros_like(p) for n, p in fwd.leaves.items()}
        else:
            fwd.check()
            if g.block_diagonal:
                diags = self._fix_diagonal(fwd, x, *fix_directions(g))
            elif bool(g.matrix.any()):
                diags = fwd.dense_diagonal(g)
            else:  # no pair in this batch
                diags = {n: torch.zeros_like(p) for n, p in fwd.leaves.items()}
        diag = torch.cat([diags[n].reshape(-1) for n in self.param_names])
        return check_finite(diag, self.name), out

    def _fix_diagonal(self, fwd: HookedForward, x: Batch, directions: Tensor, signs: Tensor) -> dict[str, Tensor]:
        """:meth:`HookedForward.fix_diagonal` on the whole batch, or on groups of its
        samples (:meth:`HookedForward.fix_groups`), each with a forward pass of its own.

        A dict batch with a right-padded ``attention_mask`` has its groups cut to their
        longest sample, once each group's embedding is checked against the whole batch's:
        a model whose embedding depends on the padding runs uncut from then on."""
        lengths = right_padded_lengths(x) if self.trim_padding else None
        groups = fwd.fix_groups(directions.shape[0], lengths)
        if len(groups) == 1 and groups[0][1] is None:
            return fwd.fix_diagonal(directions, signs)
        embedding = fwd.embedding.detach()
        del fwd  # its graph and captured inputs: each group records its own
        logger.debug("hooks: the fix diagonal in %d groups of samples", len(groups))
        total: dict[str, Tensor] = {}
        for idx, length in groups:
            sub = hooked_forward(self.model, self.call, self.param_names, take_samples(x, idx, length), self.max_elements)
            if length is not None and not _same_embedding(sub.embedding.detach(), embedding[idx.to(embedding.device)]):
                logger.info("hooks: the embedding depends on the padding of the batch; padding is kept from here on")
                self.trim_padding = False
                del sub
                return self._fix_diagonal(
                    hooked_forward(self.model, self.call, self.param_names, x, self.max_elements), x, directions, signs
                )
            part = sub.fix_diagonal(directions[:, idx], signs[:, idx])
            total = part if not total else {n: total[n] + part[n] for n in total}
        return total


def right_padded_lengths(x: Batch) -> Tensor | None:
    """``[B]`` tokens used by each sample of a dict batch whose ``attention_mask [B, T]``
    is right-padded (ones, then zeros), else None."""
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        return None
    lengths = mask.ne(0).sum(dim=1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    return lengths if bool(torch.equal(mask.ne(0), expected)) else None


def take_samples(x: Batch, idx: Tensor, length: int | None = None) -> Batch:
    """Samples ``idx`` of a tensor or dict batch; with ``length``, every ``[B, T, ...]``
    entry of a dict batch of ``T`` tokens (those of its ``attention_mask``) cut to its
    first ``length`` tokens."""
    if not isinstance(x, Mapping):
        return x[idx.to(x.device)]
    mask = x.get("attention_mask")
    shape = tuple(mask.shape[:2]) if isinstance(mask, Tensor) and mask.ndim == 2 else None
    out = {}
    for key, v in x.items():
        if isinstance(v, Tensor) and v.ndim and v.shape[0] == _batch_size(x):
            v = v[idx.to(v.device)]
            if length is not None and shape is not None and v.ndim >= 2 and v.shape[1] == shape[1]:
                v = v[:, :length]
        out[key] = v
    return out


def _same_embedding(a: Tensor, b: Tensor) -> bool:
    """Equal up to rounding (relative to the largest entry)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
