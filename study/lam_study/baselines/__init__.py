"""Baseline uncertainty methods for embedding models, compared against the Laplace posterior.

Every method exposes ``predict(x, n=None, return_samples=False) -> Prediction`` and
``sample(x, n=None) -> [n, B, D]`` unit-norm samples (:class:`UncertaintyBaseline`).
"""

from lam_study.baselines.base import UncertaintyBaseline, default_feature_fn
from lam_study.baselines.deterministic import DeterministicEmbedder
from lam_study.baselines.ensemble import DeepEnsemble
from lam_study.baselines.hib import HIB, hib_loss
from lam_study.baselines.mc_dropout import MCDropout, dropout_modules
from lam_study.baselines.pfe import PFE, mls_loss

__all__ = [
    "HIB",
    "PFE",
    "DeepEnsemble",
    "DeterministicEmbedder",
    "MCDropout",
    "UncertaintyBaseline",
    "default_feature_fn",
    "dropout_modules",
    "hib_loss",
    "mls_loss",
]
