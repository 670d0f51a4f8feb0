"""The curvature-backend interface.

A backend runs the model on one batch, lets the caller turn the outputs into the
batch's output Hessian G (which needs the outputs: pairs are mined and hinges tested
on them), and returns ``diag(J^T G J)`` over the parameter subset, where ``J`` is the
``[B*D, P]`` Jacobian of the ``[B, D]`` outputs. Sums over batches, the ``relu`` and
the prior are the caller's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..geometry import OutputHessian
from ..calling import Batch, ModelCall

HessianFn = Callable[[Tensor], OutputHessian]


class UnsupportedModelError(RuntimeError):
    """A backend cannot run this model (the message names the module or operation)."""


class CurvatureBackend(ABC):
    """Computes the signed contrastive GGN diagonal of one batch.

    Args:
        model: the user's model (never modified; backends that must change it work on a copy).
        call: calls the model on a batch and takes its ``[B, D]`` embedding.
        param_names: the parameters covered, in ``named_parameters()`` order.
    """

    name: str = "base"

    def __init__(self, model: nn.Module, call: ModelCall, param_names: Sequence[str]) -> None:
        self.model = model
        self.call = call
        self.param_names = list(param_names)

    @abstractmethod
    def batch(self, x: Batch, hessian_fn: HessianFn) -> tuple[Tensor, Tensor]:
        """Return ``(diag [P], outputs [B, D])`` for batch ``x``.

        ``hessian_fn`` maps the detached outputs ``[B, D]`` to the batch's output Hessian.
        """

    def close(self) -> None:
        """Release what the backend holds (copies, hooks)."""


def flat_jacobian(jac: Tensor) -> Tensor:
    """``[B, D, *shape] -> [B, D, prod(shape)]``."""
    return jac.reshape(jac.shape[0], jac.shape[1], -1)


def check_finite(diag: Tensor, backend: str) -> Tensor:
    """Refuse a non-finite curvature with a message that says where it came from.

    One float64 sum decides (a sum of finite float32 values cannot overflow in float64);
    only a non-finite sum is confirmed element by element."""
    if not torch.isfinite(diag.sum(dtype=torch.float64)) and not torch.isfinite(diag).all():
        raise FloatingPointError(
            f"the {backend} backend produced a non-finite curvature; check the model outputs for "
            "zero-norm embeddings (the normalisation is undefined there) or overflow"
        )
    return diag
