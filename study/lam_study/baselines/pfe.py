"""Probabilistic Face Embeddings (Shi & Jain, 2019) on a frozen embedder."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from lam_plugin.prediction import Prediction
from lam_plugin.wrapping import check_inputs, eval_mode
from lam_study.baselines.base import VarianceHeadBaseline, positive_pairs
from lam_study.training import TrainingHistory, _check_data, model_device, seeded

from ..training import check_schedule

__all__ = ["PFE", "mls_loss"]

logger = logging.getLogger(__name__)


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


class PFE(VarianceHeadBaseline):
    """Probabilistic Face Embeddings: a variance head on a frozen, trained embedder.

    The embedding ``mu = normalise(model(x))`` is kept; a head maps features of ``x`` to
    the per-dimension ``log sigma^2`` and is fitted with the mutual likelihood score on
    the positive pairs of each batch (:meth:`fit`). The model is never trained or
    modified (it runs in eval mode under ``no_grad``; its modes are restored).

    Prediction: ``mean = mu``, ``std = sigma``, samples ``normalise(mu + sigma * eps)``.

    Args:
        model: the trained embedder (frozen).
        head: module mapping ``feature_fn(x)`` to ``[B, D]`` log-variances; default
            ``InputScale Linear(F, hidden) ReLU Linear(hidden, D)`` (the input divided by the
            features' RMS), built at the first :meth:`fit`.
        feature_fn: features the head sees; default :func:`default_feature_fn` (the layers
            before the last ``nn.Linear`` of an ``nn.Sequential``, else the embedding).
        hidden: width of the default head.
        n: default number of samples.
        seed: when given, sampling noise is drawn from the global RNG seeded with it (its
            state restored afterwards).
    """

    method_name = "PFE"

    @torch.no_grad()
    def _frozen(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unit-norm embeddings and head features of ``x`` (model in eval mode)."""
        with eval_mode(self.model):
            x = x.to(model_device(self.model))
            mu = nn.functional.normalize(self.model(x).flatten(1), dim=-1)
            feats = self.feature_fn(x).flatten(1)
        return mu, feats

    @torch.no_grad()
    def mean_log_var(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``mu`` ``[B, D]`` (unit norm) and ``log sigma^2`` ``[B, D]`` of ``x``."""
        head = self._require_head()
        mu, feats = self._frozen(x)
        with eval_mode(head):
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
        feature_cache_bytes: int = 4 * 2**30,
    ) -> TrainingHistory:
        """Fit the variance head with the MLS loss; the embedder stays frozen.

        Batches are drawn by permuting indices with a ``torch.Generator`` seeded with
        ``seed`` (the default head is also initialised under that seed); batches without
        a positive pair are skipped.

        The frozen model gives the same ``mu`` and features in every epoch, so they are
        computed once, in batches, and kept on the model's device when
        ``N * (F + D) * 4`` bytes fit in ``feature_cache_bytes`` (default 4 GiB): the
        model then runs once over the data instead of twice per epoch. Above that, or
        with ``feature_cache_bytes=0``, they are recomputed for every batch. Both give the
        same head.
        """
        _check_data(images, labels)
        epochs, batch_size, lr = check_schedule(epochs, batch_size, lr)
        if feature_cache_bytes < 0:
            raise ValueError(f"feature_cache_bytes must be >= 0, got {feature_cache_bytes}")
        device = model_device(self.model)
        with seeded(seed, device):
            head = self._prepare_head(images, device)
            frozen = self._frozen_all(images, batch_size, feature_cache_bytes)
            y_all = labels.to(device)

            def batch_loss(idx: Tensor) -> Tensor | None:
                on_device = idx.to(device)
                if frozen is not None:
                    mu, feats = frozen[0][on_device], frozen[1][on_device]
                else:
                    mu, feats = self._frozen(images[idx])
                return mls_loss(mu, head(feats), y_all[on_device])

            head.train()
            history = self._fit_batches(
                len(labels), batch_loss, head.parameters(), epochs, batch_size, lr, seed, progress
            )
            head.eval()
        return history

    def _frozen_all(self, images: Tensor, batch_size: int, max_bytes: int) -> tuple[Tensor, Tensor] | None:
        """``mu`` ``[N, D]`` and features ``[N, F]`` of all ``images``, or ``None`` when over ``max_bytes``."""
        mu, feats = self._frozen(images[:1])
        needed = images.shape[0] * (mu.shape[1] + feats.shape[1]) * feats.element_size()
        if needed > max_bytes:
            logger.info(
                "%s: features of %d images need %.1f GiB > feature_cache_bytes; recomputing them per batch",
                self.method_name, images.shape[0], needed / 2**30,
            )
            return None
        parts = [self._frozen(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        return torch.cat([m for m, _ in parts]), torch.cat([f for _, f in parts])

    @torch.no_grad()
    def evaluate_loss(self, images: Tensor, labels: Tensor) -> float:
        """MLS loss of the current head over all positive pairs of ``(images, labels)``.

        Builds every pair at once (``O(N^2)`` memory): meant for small evaluation sets.
        """
        mu, log_var = self.mean_log_var(images)
        loss = mls_loss(mu, log_var, labels.to(mu.device))
        return float("nan") if loss is None else float(loss)

    @torch.no_grad()
    def predict(self, x: Tensor, n: int | None = None, return_samples: bool = False) -> Prediction:
        check_inputs(x)
        mu, log_var = self.mean_log_var(x)
        sigma = (0.5 * log_var).exp()
        samples = nn.functional.normalize(self._draw(mu, sigma, self._n(n)), dim=-1) if return_samples else None
        return Prediction(mean=mu, std=sigma, samples=samples, output_var=sigma.pow(2))
