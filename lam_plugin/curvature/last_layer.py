"""Closed-form curvature of the last ``nn.Linear`` layer.

When the model output is the output ``u = W x + b`` of its last linear layer, or its L2
normalisation ``u/||u||`` (the paper's networks), the Jacobian of output ``k`` with
respect to ``W[o, q]`` is ``A_k[:, o] x_k[q]`` with ``A_k = I`` or
``A_k = (I - û_k û_k^T)/||u_k||`` (both symmetric). Hence, with
``M[k, l, o] = (A_k G_kl A_l)[o, o]`` for the ``[D, D]`` blocks ``G_kl`` of the output
Hessian:

    diag_W[o, q] = sum_{k,l} M[k, l, o] x_k[q] x_l[q],      diag_b[o] = sum_{k,l} M[k, l, o].

Only these diagonals enter. Every block of G is a multiple of the identity plus a few
rank-one terms (:class:`~lam_plugin.geometry.OutputHessian`), and ``A_k`` is a scaled
projection, so ``M`` costs ``O(D)`` per item and per pair. ``approx="fix"`` keeps
``k = l`` only: one ``[D, B] @ [B, F]`` product per batch; ``pos`` and ``full`` add one
``[D, N] @ [N, F]`` product over their ``N`` pairs. The backbone runs once per batch,
without gradient, so a fit costs a small multiple of one forward pass over the data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..calling import Batch, ModelCall
from ..geometry import LowRankBlocks, OutputHessian
from .base import BackendOptions, CurvatureBackend, FitTarget, HessianFn, UnsupportedModelError, check_finite

__all__ = [
    "Head", "HeadJacobian", "HeadMismatchError", "LastLayerCurvature", "apply_head", "capture_io", "detect_head",
    "head_holds", "plain_linear_problem", "run_with_features",
]

Head = Literal["identity", "normalize"]
_CHUNK_ELEMENTS = 2**21


@contextlib.contextmanager
def capture_io(layer: nn.Module) -> Iterator[dict[str, Any]]:
    """Record the input and output of ``layer`` (of its last call) and how many times it
    ran (``"calls"``) while the block runs; the hook is removed after."""
    store: dict[str, Any] = {"calls": 0}

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        store["input"], store["output"] = inp[0], out
        store["calls"] += 1

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def run_with_features(
    model: nn.Module, layer: nn.Linear, x: Batch, call: ModelCall
) -> tuple[Tensor, Tensor, Tensor]:
    """``(features [B, in], layer output [B, out], model output [B, D])`` of one no-grad forward.

    Raises:
        HeadMismatchError: the layer ran more than once (a layer applied twice, its
            weights shared along the way): the output is not the head of one call's.
    """
    with torch.no_grad(), capture_io(layer) as io:
        out = call.embed(model, x)
    if "input" not in io:
        raise RuntimeError("the last linear layer did not run in this forward pass")
    if io["calls"] > 1:
        raise HeadMismatchError(f"the last linear layer runs {io['calls']} times in the forward pass, not once")
    return io["input"], io["output"], out


def apply_head(u: Tensor, head: Head) -> Tensor:
    """The model output as a function of the last layer's output."""
    return torch.nn.functional.normalize(u, dim=-1) if head == "normalize" else u


def head_holds(u: Tensor, out: Tensor, head: Head) -> bool:
    """Whether ``out`` is ``head`` applied to the last layer's output ``u``, on every item."""
    return u.ndim == 2 and u.shape == out.shape and torch.allclose(out, apply_head(u, head), rtol=1e-4, atol=1e-5)


def detect_head(u: Tensor, out: Tensor) -> Head | None:
    """Which parameter-free head maps the last layer's output ``u`` to the model output, if any."""
    for head in ("identity", "normalize"):
        if head_holds(u, out, head):
            return head
    return None


def plain_linear_problem(model: nn.Module, name: str) -> str | None:
    """Why the closed form cannot stand for the ``nn.Linear`` named ``name``, or None: it
    takes the layer's output to be ``input @ weight.T + bias`` with the layer's own,
    unshared parameters, which hooks, a parametrisation (weight or spectral norm,
    pruning), a subclass's ``forward`` or a weight tied elsewhere make untrue."""
    layer = dict(model.named_modules())[name]
    if type(layer).forward is not nn.Linear.forward:
        return f"{type(layer).__name__} overrides nn.Linear's forward"
    global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    if layer._forward_hooks or layer._forward_pre_hooks or global_hooks:
        return "forward hooks run on it"
    own = dict(layer.named_parameters(recurse=False))
    if "weight" not in own or set(own) - {"weight", "bias"} or any(True for _ in layer.children()):
        return "its weight is reparametrised (weight or spectral norm, pruning, ...)"
    canonical = {id(p): n for n, p in model.named_parameters()}
    for local, p in own.items():
        if canonical[id(p)] != f"{name}.{local}":
            return f"its {local} is shared with {canonical[id(p)]!r}"
    return None


class HeadMismatchError(RuntimeError):
    """On some batch the model output is not the head of the last layer's output (an
    elementwise nonlinearity after it, such as a ReLU, can look like the identity on the
    items probed first)."""


@dataclass(frozen=True)
class HeadJacobian:
    """The head's Jacobians ``A_k = (I - v_k v_k^T) / r_k`` (``normalize``, ``v_k = û_k``,
    ``r_k = ||u_k||``; symmetric), or ``A_k = I`` (``identity``: ``v`` and ``r`` are None).

    Attributes:
        v: ``[B, D]`` unit rows, or None.
        r: ``[B]``, or None.
    """

    v: Tensor | None
    r: Tensor | None

    @classmethod
    def at(cls, u: Tensor, head: Head) -> HeadJacobian:
        """The Jacobians of ``head`` at the layer outputs ``u [B, D]``."""
        if head == "identity":
            return cls(None, None)
        r = u.norm(dim=-1)
        return cls(u / r[:, None], r)

    def sandwich_diagonal(
        self, blocks: LowRankBlocks, k: Tensor | None = None, l: Tensor | None = None
    ) -> Tensor:
        """``[N, D]``: ``diag(A_k C_n A_l)`` for blocks ``C_n = alpha I + sum_t x_t y_t^T``
        between items ``k[n]`` and ``l[n]`` (``k = l = n``, every item once, when None), in
        ``O(T N D)``.

        With ``p(x, v) = x - v (v . x)``: ``diag(A_k x y^T A_l) = p(x, v_k) * p(y, v_l) / (r_k r_l)``
        and ``diag(A_k A_l) = (1 - v_k^2 - v_l^2 + (v_k . v_l) v_k * v_l) / (r_k r_l)``, which is
        ``(1 - v_k^2) / r_k^2`` for ``k = l``.
        """
        if self.v is None or self.r is None:
            return blocks.diagonal()
        if k is None or l is None:
            eye = 1 - self.v.pow(2)
            terms = (_project(blocks.x, self.v) * _project(blocks.y, self.v)).sum(0)
            return (blocks.alpha[:, None] * eye + terms) / self.r.pow(2)[:, None]
        vk, vl = self.v[k], self.v[l]
        eye = 1 - vk.pow(2) - vl.pow(2) + (vk * vl).sum(-1, keepdim=True) * vk * vl
        terms = (_project(blocks.x, vk) * _project(blocks.y, vl)).sum(0)
        return (blocks.alpha[:, None] * eye + terms) / (self.r[k] * self.r[l])[:, None]


def _project(x: Tensor, v: Tensor) -> Tensor:
    """``x - v (v . x)`` along the last dimension (``v`` unit, broadcast over leading dimensions)."""
    return x - v * (x * v).sum(-1, keepdim=True)


def _pair_chunk(dim: int, features: int) -> int:
    """Pairs per chunk of the cross blocks: about ``2**21`` elements per ``[N, max(D, F)]`` tensor."""
    return max(1, _CHUNK_ELEMENTS // max(dim, features))


class LastLayerCurvature(CurvatureBackend):
    """Closed-form contrastive GGN diagonal of the last linear layer (weight, bias).

    Args:
        layer_name: the ``nn.Linear`` (as in ``named_modules``).
        head: how the model output follows from that layer's output.
    """

    name = "last_layer"

    def __init__(
        self,
        model: nn.Module,
        call: ModelCall,
        param_names: Sequence[str],
        layer_name: str,
        head: Head,
    ) -> None:
        super().__init__(model, call, param_names)
        self.layer = dict(model.named_modules())[layer_name]
        if not isinstance(self.layer, nn.Linear):
            raise TypeError(f"{layer_name!r} is a {type(self.layer).__name__}, not an nn.Linear")
        self.layer_name = layer_name
        self.head = head

    @classmethod
    def create(cls, model: nn.Module, call: ModelCall, target: FitTarget, options: BackendOptions) -> LastLayerCurvature:
        if target.layer is None or target.head is None:
            raise UnsupportedModelError(
                "the last layer's closed form needs a subset that is one nn.Linear whose output, or its L2 "
                "normalisation, is the embedding (subset='last_layer' finds it)"
            )
        return cls(model, call, target.names, target.layer, target.head)  # type: ignore[arg-type]

    def batch(self, x: Batch, hessian_fn: HessianFn) -> tuple[Tensor, Tensor]:
        """As :meth:`CurvatureBackend.batch`.

        Raises:
            HeadMismatchError: the model output does not follow from the layer's output
                by the head on this batch (checked before ``hessian_fn`` is called).
        """
        feats, u, out = run_with_features(self.model, self.layer, x, self.call)
        self.check_head(u, out)
        return self.from_features(feats, u, hessian_fn(out)), out

    def check_head(self, u: Tensor, out: Tensor) -> None:
        """Raise :class:`HeadMismatchError` unless ``out`` is the head of ``u``."""
        if not head_holds(u, out, self.head):
            raise HeadMismatchError(
                f"the model output is not '{self.head}' of the output of layer {self.layer_name!r} on this batch"
            )

    def from_features(self, feats: Tensor, u: Tensor, g: OutputHessian) -> Tensor:
        """``diag(J^T G J)`` over the layer's parameters from its input ``feats [B, F]`` and
        output ``u [B, D]`` (at whatever weights produced ``u``).

        The per-item diagonals ``m_k = diag(A_k G_kk A_k)`` give ``m^T feats^2``; each
        folded cross block ``C_n`` between items ``k, l`` adds ``diag(A_k C_n A_l)`` times
        ``feats_k * feats_l`` (one ``[D, N] @ [N, F]`` product per chunk of pairs). Memory
        is ``O(B^2 + (B + N) (D + F))``, never ``[pairs, D, D]`` or ``[B*D, B*D]``. A sum
        with a NaN or an infinite term is not finite, so the entrywise finiteness check
        runs only when the sum of the diagonal is not finite.
        """
        head = HeadJacobian.at(u, self.head)
        m = head.sandwich_diagonal(g.self_blocks()).to(feats.dtype)
        weight = m.T @ feats.pow(2)
        bias = m.sum(0)
        for k, l, blocks in g.cross_blocks(_pair_chunk(u.shape[1], feats.shape[1])):
            c = head.sandwich_diagonal(blocks, k, l).to(feats.dtype)
            weight += c.T @ (feats[k] * feats[l])
            bias += c.sum(0)
        parts = {"weight": weight, "bias": bias}
        diag = torch.cat([parts[n.rpartition(".")[2]].reshape(-1) for n in self.param_names])
        return diag if torch.isfinite(diag.sum()) else check_finite(diag, self.name)
