"""The curvature-backend interface.

A backend runs the model on one batch, lets the caller turn the outputs into the
batch's output Hessian G (which needs the outputs: pairs are mined and hinges tested
on them), and returns ``diag(J^T G J)`` over the parameter subset, where ``J`` is the
``[B*D, P]`` Jacobian of the ``[B, D]`` outputs, at the model's weights or at other
values of the subset's weights (:meth:`CurvatureBackend.batch_at`, what online LAM
needs). Sums over batches, the ``relu`` and the prior are the caller's business.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..calling import Batch, ModelCall
from ..geometry import OutputHessian

__all__ = [
    "BackendOptions",
    "CurvatureBackend",
    "FitTarget",
    "HessianFn",
    "UnsupportedModelError",
    "check_finite",
    "flat_jacobian",
]

HessianFn = Callable[[Tensor], OutputHessian]


@dataclass(frozen=True)
class FitTarget:
    """The weights a posterior covers.

    Attributes:
        names: the parameters, in ``named_parameters()`` order.
        layer: the ``nn.Linear`` of a last-layer subset (or of a subset naming one).
        head: the parameter-free map from that layer's output to the embedding
            (``"identity"`` or ``"l2"``), None where there is none.
    """

    names: list[str] = field(default_factory=list)
    layer: str | None = None
    head: str | None = None


@dataclass(frozen=True)
class BackendOptions:
    """Settings a backend may use: ``chunk_size`` (vmap chunks of torch.func),
    ``mc_samples`` (random directions per batch of the Monte Carlo backend) and ``seed``."""

    chunk_size: int | None = None
    mc_samples: int = 16
    seed: int = 0


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

    @classmethod
    def create(cls, model: nn.Module, call: ModelCall, target: FitTarget, options: BackendOptions) -> CurvatureBackend:
        """The backend for ``target`` of ``model``; a subclass whose constructor takes more
        than the three arguments of this one overrides this to read them from ``options``."""
        return cls(model, call, target.names)

    def batch_at(self, x: Batch, hessian_fn: HessianFn, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """:meth:`batch` with the subset's weights set to ``params`` (name -> tensor) and the
        rest of the model as it is now. The default writes them into the model for the call
        and puts the model's own values back afterwards, also on error."""
        with self._weights_at(params):
            return self.batch(x, hessian_fn)

    @contextlib.contextmanager
    def _weights_at(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        named = dict(self.model.named_parameters())
        kept = {n: named[n].detach().clone() for n in self.param_names}
        try:
            with torch.no_grad():
                for n in self.param_names:
                    named[n].copy_(params[n])
            yield
        finally:
            with torch.no_grad():
                for n, value in kept.items():
                    named[n].copy_(value)

    @abstractmethod
    def batch(self, x: Batch, hessian_fn: HessianFn) -> tuple[Tensor, Tensor]:
        """Return ``(diag [P], outputs [B, D])`` for batch ``x``.

        ``hessian_fn`` maps the detached outputs ``[B, D]`` to the batch's output Hessian.
        """

    def close(self) -> None:  # noqa: B027 (a default that holds nothing to release)
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
