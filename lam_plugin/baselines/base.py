"""The common interface of the baseline uncertainty methods."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor, nn

from lam_plugin.prediction import Prediction
from lam_plugin.training import model_device, preserve_modes

__all__ = ["UncertaintyBaseline", "default_feature_fn", "normalized_forward", "variance_head", "positive_pairs"]


class UncertaintyBaseline(ABC):
    """A method that turns inputs into a distribution over unit-norm embeddings.

    Subclasses implement :meth:`sample`; :meth:`predict` summarises ``n`` samples with
    :meth:`Prediction.from_samples` unless a subclass has a closed form.
    """

    #: number of samples used when ``n`` is not given.
    default_n: int = 100

    @abstractmethod
    def sample(self, x: Tensor, n: int | None = None) -> Tensor:
        """``[n, B, D]`` unit-norm embedding samples for the ``B`` inputs ``x``."""

    @torch.no_grad()
    def predict(self, x: Tensor, n: int | None = None, return_samples: bool = False) -> Prediction:
        """Mean, per-dimension std (and optionally the samples) of the embeddings of ``x``."""
        return Prediction.from_samples(self.sample(x, n), keep_samples=return_samples)

    def __call__(self, x: Tensor, n: int | None = None, return_samples: bool = False) -> Prediction:
        return self.predict(x, n=n, return_samples=return_samples)

    def _n(self, n: int | None) -> int:
        n = self.default_n if n is None else int(n)
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        return n


@torch.no_grad()
def normalized_forward(model: nn.Module, x: Tensor) -> Tensor:
    """``[B, D]`` unit-norm embeddings of ``x`` by ``model`` in eval mode (modes restored)."""
    with preserve_modes(model):
        model.eval()
        out = model(x.to(model_device(model)))
    return torch.nn.functional.normalize(out.flatten(1), dim=-1)


def default_feature_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The features a variance head sees by default.

    For an ``nn.Sequential`` with an ``nn.Linear`` layer: the output of the layers before
    its last ``nn.Linear`` (the penultimate features), flattened; when that Linear is the
    first layer, the flattened input itself. For any other model, the model's own output
    (the embedding).
    """
    if isinstance(model, nn.Sequential):
        linear_idx = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
        if linear_idx and linear_idx[-1] > 0:
            trunk = model[: linear_idx[-1]]
            return lambda x: trunk(x).flatten(1)
        if linear_idx:  # the first layer is the last Linear: its input is the raw input
            return lambda x: x.flatten(1)
    return lambda x: model(x).flatten(1)


def variance_head(in_features: int, out_features: int, hidden: int = 64) -> nn.Sequential:
    """The default head predicting per-dimension ``log sigma^2``: ``Linear ReLU Linear``."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


def positive_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Index pairs ``(i, j)``, ``i < j``, of same-label examples of a batch."""
    i, j = torch.triu_indices(labels.numel(), labels.numel(), offset=1, device=labels.device)
    keep = labels[i] == labels[j]
    return i[keep], j[keep]
