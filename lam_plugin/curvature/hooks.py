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
samples: ``D`` passes seeded with the unit vectors ``e_d`` for all samples give every
layer's output gradients for every output dimension. For an ``nn.Linear`` each block of
G (identity plus rank-one terms) is contracted through token pairs, as for ``fix``
(``TokenLinearRule.dense_add``); other layers turn them into Jacobian chunks
``[B, D, rows * row_size]`` contracted with ``OutputHessian.contract``. Memory: the stored output gradients (``D`` times the hooked
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
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..calling import Batch, ModelCall
from ..geometry import LowRankBlocks, OutputHessian
from ._hooked_forward import (
    MAX_ELEMENTS,
    HookedForward,
    batch_size,
    hooked_forward,
    hooks_support,
    owners,
    same_embedding,
)
from .base import CurvatureBackend, HessianFn, check_finite

__all__ = ["MAX_ELEMENTS", "HooksBackend", "block_factors", "fix_directions", "hooked_forward", "hooks_support"]

logger = logging.getLogger(__name__)


def block_factors(blocks: LowRankBlocks, backend: str = "hooks") -> tuple[Tensor, Tensor, Tensor]:
    """``(alpha [B], basis [B, D, r], core [B, r, r])`` with
    ``G_k = alpha_k I + basis_k core_k basis_k^T`` (``basis`` orthonormal, ``core`` symmetric)
    for symmetric blocks ``G_k = alpha_k I + sum_t x_t y_t^T`` with a few terms
    (``OutputHessian.self_blocks``).

    The span of the ``2T`` vectors ``x_t, y_t`` holds the low-rank part, so their QR gives a
    basis for it and ``core = sum_t (basis^T x_t)(basis^T y_t)^T``: no ``[D, D]`` block is
    formed or decomposed.

    Non-finite blocks (a zero-norm output has no direction ``e_k``) raise the
    ``FloatingPointError`` of :func:`.base.check_finite`, naming ``backend``, before a
    factorisation fails on them (``eigh`` does not converge on NaN).
    """
    for part in (blocks.alpha, blocks.x, blocks.y):
        check_finite(part, backend)
    x, y = blocks.x.permute(1, 2, 0), blocks.y.permute(1, 2, 0)  # [B, D, T]
    basis = torch.linalg.qr(torch.cat([x, y], dim=2)).Q
    core = (basis.mT @ x) @ (basis.mT @ y).mT
    return blocks.alpha, basis, (core + core.mT) / 2


def fix_directions(g: OutputHessian, backend: str = "hooks") -> tuple[Tensor, Tensor]:
    """``(directions [n, B, D], signs [n, B])`` with ``G_k = sum_r signs[r,k] w_rk w_rk^T``
    for a block-diagonal G (:func:`block_factors`): the ``D`` unit vectors scaled by
    ``sqrt|alpha_k|``, and the eigenvectors ``basis_k v`` of ``core_k`` scaled by
    ``sqrt|mu|``. A direction whose scale is at rounding level in every sample is dropped.
    Non-finite blocks raise ``FloatingPointError`` naming ``backend`` (:func:`block_factors`)."""
    alpha, basis, core = block_factors(g.self_blocks(), backend)
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
        owners(model, param_names)
        self.max_elements = max_elements
        self.trim_padding = True

    def batch(self, x: Batch, hessian_fn: HessianFn) -> tuple[Tensor, Tensor]:
        fwd = self._forward(x)
        out = fwd.embedding.detach()
        g = hessian_fn(out)
        diags = {n: torch.zeros_like(p) for n, p in fwd.leaves.items()}  # kept where no pair is in the batch
        if fwd.embedding.requires_grad:  # else no subset parameter reaches the embedding
            fwd.check()
            if g.block_diagonal:
                diags = self._fix_diagonal(fwd, x, *fix_directions(g, self.name))
            elif bool(g.signed_counts.any()):
                diags = fwd.dense_diagonal(g)
        diag = torch.cat([diags[n].reshape(-1) for n in self.param_names])
        return check_finite(diag, self.name), out

    def _forward(self, x: Batch) -> HookedForward:
        return hooked_forward(self.model, self.call, self.param_names, x, self.max_elements)

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
            sub = self._forward(take_samples(x, idx, length))
            if length is not None and not same_embedding(sub.embedding.detach(), embedding[idx.to(embedding.device)]):
                logger.info("hooks: the embedding depends on the padding of the batch; padding is kept from here on")
                self.trim_padding = False
                del sub
                return self._fix_diagonal(self._forward(x), x, directions, signs)
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
    tokens = mask.shape[1] if isinstance(mask, Tensor) and mask.ndim == 2 else None
    bsz = batch_size(x)
    out = {}
    for key, v in x.items():
        if isinstance(v, Tensor) and v.ndim and v.shape[0] == bsz:
            v = v[idx.to(v.device)]
            if length is not None and tokens is not None and v.ndim >= 2 and v.shape[1] == tokens:
                v = v[:, :length]
        out[key] = v
    return out
