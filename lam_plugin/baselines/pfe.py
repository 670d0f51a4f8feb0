"""Probabilistic Face Embeddings (Shi & Jain, 2019) on a frozen embedder."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lam_plugin.baselines.base import (
    UncertaintyBaseline,
    default_feature_fn,
    positive_pairs,
    variance_head,
)
from lam_plugin.prediction import Prediction
from lam_plugin.training import TrainingHistory, _check_data, model_device, preserve_modes, seeded

__all__ = ["PFE", "mls_loss"]


def mls_loss(mu: Tensor, log_var: Tensor, labels: Tensor) -> Tensor | None:
    """Mean negative mutual likelihood score over the positive pairs of a batch.

    ``MLS(i, j) = sum_d (mu_id - mu_jd)^2 / (s2_id + s2_jd) + log(s2_id + s2_jd)`` (without
    the constant), averaged over all pairs ``i < j`` with equal labels. ``None`` when the
    batch has no positive pair.
    """
    i, j = positive_pairs(labels)
    if i.numel() == 0:
        return None
    var = log_var.exp()
    var_sum = var[i] + var[j]
    return (((mu[i] - mu[j]) ** 2) / var_sum + var_sum.log()).sum(-1).mean()


class PFE(UncertaintyBaseline):
    """Probabilistic Face Embeddings: a variance head on a frozen, trained embedder.

    The embedding ``mu = normalise(model(x))`` is kept; a head maps features of ``x`` to
    the per-dimension ``log sigma^2`` and is fitted with the mutual likelihood score on
    the positive pairs of each batch (:meth:`fit`). The model is never trained or
    modified (it runs in eval mode under ``no_grad``; its modes are restored).

    Prediction: ``mean = mu``, ``std = sigma``, samples ``normalise(mu + sigma * eps)``.

    Args:
        model: the trained embedder (frozen).
        head: module mapping ``feature_fn(x)`` to ``[B, D]`` log-variances; default
            ``Linear(F, hidden) ReLU Linear(hidden, D)``, built at the first :meth:`fit`.
        feature_fn: features the head sees; default :func:`default_feature_fn` (the layers
            before the last ``nn.Linear`` of an ``nn.Sequential``, else the embedding).
        hidden: width of the default head.
        n: default number of samples.
        seed: when given, sampling noise is drawn from the global RNG seeded with it (its
            state restored afterwards).
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module | None = None,
        feature_fn: Callable[[Tensor], Tensor] | None = None,
        hidden: int = 64,
        n: int = 100,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.head = head
        self.feature_fn = feature_fn if feature_fn is not None else default_feature_fn(model)
        self.hidden = hidden
        self.default_n = self._n(n)
        self.seed = seed

    @torch.no_grad()
    def _frozen(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unit-norm embeddings and head features of ``x`` (model in eval mode)."""
        with preserve_modes(self.model):
            self.model.eval()
            x = x.to(model_device(self.model))
            mu = nn.functional.normalize(self.model(x).flatten(1), dim=-1)
            feats = self.feature_fn(x).flatten(1)
        return mu, feats

    def _require_head(self) -> nn.Module:
        if self.head is None:
            raise RuntimeError("PFE has no variance head yet: call fit() first or pass head=")
        return self.head

    @torch.no_grad()
    def mean_log_var(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``mu`` ``[B, D]`` (unit norm) and ``log sigma^2`` ``[B, D]`` of ``x``."""
        head = self._require_head()
        mu, feats = self._frozen(x)
        with preserve_modes(head):
            head.eval()
            log_var = head(feats.to(model_device(head)))
        return mu, log_var.to(mu.device)

    def fit(
        self,
        images: Tensor,
        labels: Tensor,
        epochs: int = 10,
        batch_size: int = 256,
        lr: float = 1e-3,
        seed: int = 0,
        progress: bool = False,
    ) -> TrainingHistory:
        """Fit the variance head with the MLS loss; the embedder stays frozen.

        Batches are drawn by permuting indices with a ``torch.Generator`` seeded with
        ``seed`` (the default head is also initialised under that seed); batches without
        a positive pair are skipped.
        """
        _check_data(images, labels)
        device = model_device(self.model)
        with seeded(seed, device):
            if self.head is None:
                mu, feats = self._frozen(images[:2])
                self.head = variance_head(feats.shape[1], mu.shape[1], self.hidden)
            self.head.to(device)
            opt = torch.optim.Adam(self.head.parameters(), lr=lr)
            generator = torch.Generator().manual_seed(seed)
            history = TrainingHistory()
            self.head.train()
            for _ in tqdm(range(epochs), desc="PFE", disable=not progress):
                order = torch.randperm(images.shape[0], generator=generator).to(images.device)
                total, steps = 0.0, 0
                for start in range(0, images.shape[0], batch_size):
                    idx = order[start : start + batch_size]
                    mu, feats = self._frozen(images[idx])
                    loss = mls_loss(mu, self.head(feats), labels[idx].to(device))
                    if loss is None:
                        continue
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    history.batch_losses.append(float(loss.detach()))
                    total += history.batch_losses[-1]
                    steps += 1
                history.epoch_losses.append(total / steps if steps else float("nan"))
            self.head.eval()
        return history

    @torch.no_grad()
    def evaluate_loss(self, images: Tensor, labels: Tensor) -> float:
        """MLS loss of the current head over all positive pairs of ``(images, labels)``.

        Builds every pair at once (``O(N^2)`` memory): meant for small evaluation sets.
        """
        mu, log_var = self.mean_log_var(images)
        loss = mls_loss(mu, log_var, labels.to(mu.device))
        return float("nan") if loss is None else float(loss)

    def _draw(self, mu: Tensor, sigma: Tensor, n: int) -> Tensor:
        with seeded(self.seed, mu.device):
            eps = torch.randn((n, *mu.shape), device=mu.device, dtype=mu.dtype)
        return nn.functional.normalize(mu + sigma * eps, dim=-1)

    @torch.no_grad()
    def sample(self, x: Tensor, n: int | None = None) -> Tensor:
        mu, log_var = self.mean_log_var(x)
        return self._draw(mu, (0.5 * log_var).exp(), self._n(n))

    @torch.no_grad()
    def predict(self, x: Tensor, n: int | None = None, return_samples: bool = False) -> Prediction:
        mu, log_var = self.mean_log_var(x)
        sigma = (0.5 * log_var).exp()
        samples = self._draw(mu, sigma, self._n(n)) if return_samples else None
        return Prediction(mean=mu, std=sigma, samples=samples)
