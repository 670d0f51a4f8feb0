"""Closed-form curvature of the last ``nn.Linear`` layer.

When the model output is the output ``u = W x + b`` of its last linear layer, or its L2
normalisation ``u/||u||`` (the paper's networks), the Jacobian of output ``k`` with
respect to ``W[o, q]`` is ``Phi_k[:, o] x_k[q]`` with ``Phi_k = I`` or
``Phi_k = (I - û_k û_k^T)/||u_k||``. Hence, with ``G' = Phi^T G Phi`` (blockwise) and
``M[k, l, o] = G'[k, o, l, o]``:

    diag_W[o, q] = sum_{k,l} M[k, l, o] x_k[q] x_l[q],      diag_b[o] = sum_{k,l} M[k, l, o].

For ``approx="fix"`` only ``k = l`` survives. The backbone runs once per batch, without
gradient, so a fit costs about one forward pass over the data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..geometry import OutputHessian
from ..calling import Batch, ModelCall
from .base import CurvatureBackend, HessianFn, check_finite

Head = Literal["identity", "normalize"]


@contextlib.contextmanager
def capture_io(layer: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the input and output of ``layer`` while the block runs; the hook is removed after."""
    store: dict[str, Tensor] = {}

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        store["input"], store["output"] = inp[0], out

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def run_with_features(
    model: nn.Module, layer: nn.Linear, x: Batch, call: ModelCall
) -> tuple[Tensor, Tensor, Tensor]:
    """``(features [B, in], layer output [B, out], model output [B, D])`` of one no-grad forward."""
    with torch.no_grad(), capture_io(layer) as io:
        out = call.embed(model, x)
    if "input" not in io:
        raise RuntimeError("the last linear layer did not run in this forward pass")
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
        if head_holds(u, out, head):  # type: ignore[arg-type]
            return head  # type: ignore[return-value]
    return None


class HeadMismatchError(RuntimeError):
    """On some batch the model output is not the head of the last layer's output (an
    elementwise nonlinearity after it, such as a ReLU, can look like the identity on the
    items probed first)."""


def _head_jacobian(u: Tensor, head: Head) -> Tensor | None:
    """``Phi [B, D, D]``: Jacobian of the head at ``u``; None for the identity."""
    if head == "identity":
        return None
    norm = u.norm(dim=-1, keepdim=True)
    uh = u / norm
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    return (eye - uh.unsqueeze(-1) * uh.unsqueeze(-2)) / norm.unsqueeze(-1)


def _per_unit(g: OutputHessian, phi: Tensor | None, bsz: int) -> Tensor:
    """``M``: ``[B, out]`` (block diagonal G) or ``[B, B, out]`` (dense G); see the module docstring."""
    if g.block_diagonal:
        blocks = g.matrix if phi is None else phi.transpose(1, 2) @ g.matrix @ phi
        return torch.diagonal(blocks, dim1=1, dim2=2)
    dense = g.matrix.reshape(bsz, -1, bsz, g.matrix.shape[0] // bsz)
    if phi is None:
        return torch.diagonal(dense, dim1=1, dim2=3)
    return torch.einsum("kdo,kdle,leo->klo", phi, dense, phi)


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
        """``diag(J^T G J)`` over the layer's parameters from its input ``feats [B, in]`` and
        output ``u [B, out]`` (at whatever weights produced ``u``)."""
        m = _per_unit(g, _head_jacobian(u, self.head), u.shape[0]).to(feats.dtype)
        if g.block_diagonal:
            weight = m.T @ feats.pow(2)
            bias = m.sum(0)
        else:
            weight = ((m.permute(2, 0, 1) @ feats) * feats).sum(1)
            bias = m.sum(dim=(0, 1))
        parts = {"weight": weight, "bias": bias}
        diag = torch.cat([parts[n.rpartition(".")[2]].reshape(-1) for n in self.param_names])
        return check_finite(diag, self.name)
