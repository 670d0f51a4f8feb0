"""Curvature backends: the contrastive GGN diagonal of one batch over a parameter subset.

Every backend implements :class:`CurvatureBackend`; ``LaplaceEmbedder(backend=...)``
takes a registered name (:data:`BACKENDS`), a subclass or an instance
(docs/curvature.md).
"""

from .backpack import BackpackBackend
from .base import BackendOptions, CurvatureBackend, FitTarget, HessianFn, UnsupportedModelError
from .functorch import FunctorchBackend
from .hooks import HooksBackend
from .last_layer import HeadMismatchError, LastLayerCurvature
from .montecarlo import MonteCarloBackend
from .selection import BACKENDS, BackendSpec, make_backend, register_backend

__all__ = [
    "BACKENDS",
    "BackendOptions",
    "BackendSpec",
    "BackpackBackend",
    "CurvatureBackend",
    "FitTarget",
    "FunctorchBackend",
    "HeadMismatchError",
    "HessianFn",
    "HooksBackend",
    "LastLayerCurvature",
    "MonteCarloBackend",
    "UnsupportedModelError",
    "make_backend",
    "register_backend",
]
