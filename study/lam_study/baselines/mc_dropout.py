"""Monte-Carlo dropout: dropout kept active at test time."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lam_plugin.wrapping import eval_mode
from lam_study.baselines.base import UncertaintyBaseline
from lam_study.training import model_device, seeded

__all__ = ["MCDropout", "dropout_modules"]


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """All dropout layers of ``model`` (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ...)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


class MCDropout(UncertaintyBaseline):
    """MC dropout (Gal & Ghahramani, 2016) on a model trained with dropout.

    At prediction time only the model's dropout modules are put in train mode; every
    other module (BatchNorm included) runs in eval mode, and all modes are restored
    afterwards. The ``n`` stochastic passes are batched: the input batch is repeated
    ``k`` times per forward (with ``k * B <= max_batch``), since every row draws its own
    dropout mask.

    Args:
        model: an embedder with at least one dropout module.
        n: default number of stochastic passes.
        max_batch: most rows per forward pass when repeating the batch.
        seed: when given, the dropout masks are drawn from the global RNG seeded with it
            (its state restored afterwards), so predictions are reproducible.
    """

    def __init__(self, model: nn.Module, n: int = 100, max_batch: int = 4096, seed: int | None = None) -> None:
        if not dropout_modules(model):
            raise ValueError("MCDropout needs a model with at least one nn.Dropout* module")
        self.model = model
        self.default_n = self._n(n)
        self.max_batch = int(max_batch)
        self.seed = seed

    @torch.no_grad()
    def sample_outputs(self, x: Tensor, n: int | None = None) -> Tensor:
        n = self._n(n)
        device = model_device(self.model)
        x = x.to(device)
        b = x.shape[0]
        per_pass = max(1, min(n, self.max_batch // max(b, 1)))
        chunks: list[Tensor] = []
        with eval_mode(self.model), seeded(self.seed, device):
            for m in dropout_modules(self.model):
                m.train()
            done = 0
            while done < n:
                k = min(per_pass, n - done)
                xk = x.repeat(k, *([1] * (x.ndim - 1)))
                out = self.model(xk).flatten(1)
                chunks.append(out.view(k, b, -1))
                done += k
        return torch.cat(chunks)
