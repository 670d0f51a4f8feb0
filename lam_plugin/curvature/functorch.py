"""Curvature with torch.func: per-sample Jacobians of any module.

``vmap(jacrev(...))`` over ``functional_call`` gives ``J [B, D, P]`` for every
parameter tensor of the subset; ``diag(J^T G J)`` is then formed tensor by tensor.
Works for any module (LayerNorm, GELU, functional calls, ...), which makes it the
fallback and the reference; memory is ``B * D * P`` for the Jacobians of one batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap
from torch.utils._pytree import tree_map

from ..calling import Batch, ModelCall
from .base import (
    BackendOptions,
    CurvatureBackend,
    FitTarget,
    HessianFn,
    UnsupportedModelError,
    check_finite,
    flat_jacobian,
)

__all__ = ["FunctorchBackend"]


class FunctorchBackend(CurvatureBackend):
    """Per-sample Jacobians with ``torch.func``; ``chunk_size`` bounds vmap's memory."""

    name = "torch.func"

    def __init__(
        self,
        model: nn.Module,
        call: ModelCall,
        param_names: Sequence[str],
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(model, call, param_names)
        self.chunk_size = chunk_size
        hooked = [name or "the model" for name, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
        if hooked:  # torch wraps such modules in an autograd.Function that vmap cannot transform
            raise UnsupportedModelError(
                f"torch.func cannot run modules with backward hooks registered ({', '.join(map(repr, hooked[:4]))}): "
                "remove the hooks for the fit, or use backend='hooks' or 'montecarlo'"
            )

    @classmethod
    def create(cls, model: nn.Module, call: ModelCall, target: FitTarget, options: BackendOptions) -> FunctorchBackend:
        return cls(model, call, target.names, options.chunk_size)

    def jacobians(self, x: Batch, params: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """Per-sample Jacobians ``{name: [B, D, *shape]}`` and outputs ``[B, D]``.

        ``params`` (name -> tensor over the subset) evaluates them at other weights than
        the model's own.
        """
        named = dict(self.model.named_parameters()) if params is None else dict(params)
        sub = {n: named[n].detach() for n in self.param_names}

        def one(p: dict[str, Tensor], xi: Batch) -> tuple[Tensor, Tensor]:
            out = self.call.functional(self.model, p, tree_map(lambda t: t.unsqueeze(0), xi))
            return out[0], out[0]

        jac, out = vmap(jacrev(one, has_aux=True), in_dims=(None, 0), chunk_size=self.chunk_size)(sub, x)
        return jac, out

    def batch(
        self, x: Batch, hessian_fn: HessianFn, params: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        jac, out = self.jacobians(x, params)
        g = hessian_fn(out.detach())
        diag = torch.cat([g.contract(flat_jacobian(jac[n])) for n in self.param_names])
        return check_finite(diag, self.name), out.detach()

    def batch_at(self, x: Batch, hessian_fn: HessianFn, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """:meth:`batch` at ``params``, functionally: the model is not written to."""
        return self.batch(x, hessian_fn, params)
