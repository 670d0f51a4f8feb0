"""Which curvature backend a fit uses: a registered name, a class, an instance, or ``"auto"``.

``"auto"`` (docs/curvature.md) takes the last layer's closed form where the embedding is
that layer's output or its L2 normalisation, else BackPACK where it supports every
module, else the hooks backend where it covers the subset, else torch.func. When a
backend refuses a batch part-way through a fit, :func:`fallback_backend` says which one
takes over from that batch.
"""

from __future__ import annotations

import logging

from torch import nn

from ..calling import ModelCall
from .backpack import BackpackBackend, backpack_support
from .base import BackendOptions, CurvatureBackend, FitTarget, UnsupportedModelError
from .functorch import FunctorchBackend
from .hooks import HooksBackend, hooks_support
from .last_layer import HeadMismatchError, LastLayerCurvature
from .montecarlo import MonteCarloBackend

__all__ = ["BACKENDS", "BackendSpec", "check_backend", "fallback_backend", "make_backend", "register_backend"]

logger = logging.getLogger(__name__)

#: the backends ``backend=`` accepts by name (besides ``"auto"``); :func:`register_backend` adds one
BACKENDS: dict[str, type[CurvatureBackend]] = {
    "backpack": BackpackBackend,
    "torch.func": FunctorchBackend,
    "hooks": HooksBackend,
    "montecarlo": MonteCarloBackend,
    "last_layer": LastLayerCurvature,
}

BackendSpec = str | type[CurvatureBackend] | CurvatureBackend


def register_backend(name: str, backend: type[CurvatureBackend]) -> None:
    """Make ``backend`` available as ``LaplaceEmbedder(backend=name)``."""
    if not (isinstance(backend, type) and issubclass(backend, CurvatureBackend)):
        raise TypeError(f"backend must be a CurvatureBackend subclass, got {backend!r}")
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name must be a non-empty string other than 'auto', got {name!r}")
    BACKENDS[name] = backend


def check_backend(spec: BackendSpec) -> None:
    """Refuse, before any work, a ``backend`` that is none of the accepted kinds."""
    if isinstance(spec, CurvatureBackend) or (isinstance(spec, type) and issubclass(spec, CurvatureBackend)):
        return
    if spec == "auto" or (isinstance(spec, str) and spec in BACKENDS):
        return
    raise ValueError(
        f"backend must be 'auto', one of {tuple(BACKENDS)}, or a CurvatureBackend class or instance, got {spec!r}"
    )


def make_backend(
    spec: BackendSpec, model: nn.Module, call: ModelCall, target: FitTarget, options: BackendOptions
) -> CurvatureBackend:
    """The backend ``spec`` names for ``target`` of ``model``.

    An instance is used as it is, after checking that it covers this model and subset.
    """
    if isinstance(spec, CurvatureBackend):
        if spec.model is not model or list(spec.param_names) != list(target.names):
            raise ValueError(
                "the CurvatureBackend instance given as backend covers another model or other parameters than this "
                f"fit ({len(spec.param_names)} parameter tensors against {len(target.names)}); build it with the "
                "embedder's model and subset, or pass its class"
            )
        return spec
    if isinstance(spec, type):
        return spec.create(model, call, target, options)
    if spec == "auto":
        return auto_backend(model, call, target, options)
    return BACKENDS[spec].create(model, call, target, options)


def auto_backend(model: nn.Module, call: ModelCall, target: FitTarget, options: BackendOptions) -> CurvatureBackend:
    """The backend ``"auto"`` chooses (module docstring); it logs its choice."""
    if target.layer is not None and target.head is not None:
        logger.info("backend auto: the closed form of layer %r (head %s)", target.layer, target.head)
        return LastLayerCurvature.create(model, call, target, options)
    converted, reason = backpack_support(model)
    if converted is not None:
        logger.info("backend auto: BackPACK")
        return BackpackBackend(model, call, target.names, converted=converted)
    hooks_reason = hooks_support(model, target.names)
    if hooks_reason is None:
        logger.info("backend auto: hooks (BackPACK does not support %s)", reason)
        return HooksBackend.create(model, call, target, options)
    logger.warning(
        "BackPACK does not support %s, and the hooks backend does not support %s; using the torch.func backend",
        reason,
        hooks_reason,
    )
    return FunctorchBackend.create(model, call, target, options)


def fallback_backend(
    spec: BackendSpec, engine: CurvatureBackend, err: Exception, target: FitTarget, options: BackendOptions
) -> CurvatureBackend:
    """The backend that takes over from ``engine`` after it refused a batch with ``err``,
    or ``err`` again.

    The closed form was exact on every earlier batch (each is checked), and the hooks
    backend refuses a model before it returns anything wrong, so what they added
    stands: under ``"auto"`` the general backend (torch.func after the hooks) continues
    from this batch. A backend named by the user is not replaced.
    """
    if spec != "auto" or not isinstance(err, (HeadMismatchError, UnsupportedModelError)):
        raise err
    if isinstance(err, UnsupportedModelError) and not isinstance(engine, HooksBackend):
        raise err
    engine.close()
    if isinstance(err, HeadMismatchError):
        return auto_backend(engine.model, engine.call, FitTarget(target.names), options)
    return FunctorchBackend.create(engine.model, engine.call, target, options)
