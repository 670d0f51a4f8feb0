"""lam-plugin: Laplace-approximation uncertainty for any PyTorch embedding model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .embedder import LaplaceEmbedder
from .modules import L2Normalize
from .posterior import EmbeddingPosterior, FitStats, PosteriorConfig, PosteriorSummary
from .prediction import Prediction

if TYPE_CHECKING:
    from .index import SearchResult, UncertainIndex

_LAZY = {"UncertainIndex": "index", "SearchResult": "index"}


def __getattr__(name: str) -> Any:
    """``UncertainIndex`` and ``SearchResult``, imported on first use: they load FAISS."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EmbeddingPosterior",
    "FitStats",
    "L2Normalize",
    "LaplaceEmbedder",
    "PosteriorConfig",
    "PosteriorSummary",
    "Prediction",
    "SearchResult",
    "UncertainIndex",
    "__version__",
]
