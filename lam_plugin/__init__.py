"""lam-plugin: Laplace-approximation uncertainty for any PyTorch embedding model."""

from __future__ import annotations

__version__ = "0.1.0"

from .embedder import LaplaceEmbedder
from .modules import L2Normalize
from .posterior import EmbeddingPosterior, FitStats, PosteriorConfig, PosteriorSummary
from .prediction import Prediction

__all__ = [
    "EmbeddingPosterior",
    "FitStats",
    "L2Normalize",
    "LaplaceEmbedder",
    "PosteriorConfig",
    "PosteriorSummary",
    "Prediction",
    "__version__",
]
