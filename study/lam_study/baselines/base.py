"""The common interface of the baseline uncertainty methods."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lam_plugin.numerics import flush_denormals
from lam_plugin.prediction import Prediction
from lam_plugin.wrapping import check_inputs, eval_mode
from lam_study.training import TrainingHistory, model_device, seeded

__all__ = [
    "InputScale",
    "UncertaintyBaseline",
    "VarianceHeadBaseline",
    "default_feature_fn",
    "eval_forward",
    "feature_scale",
    "normalized_forward",
    "positive_pairs",
    "variance_head",
]

#: Training images whose features set the default head's input scale, and the batch
#: size in which their features are computed.
_SCALE_EXAMPLES, _SCALE_BATCH = 1024, 256


class UncertaintyBaseline(ABC):
    """A method that turns inputs into a distribution over unit-norm embeddings.

    Subclasses implement :meth:`sample_outputs`, the model outputs before the L2
    normalisation; :meth:`sample` normalises them and :meth:`predict` summarises them with
    :meth:`Prediction.from_outputs` (so ``output_var`` is filled) unless a subclass has a
    closed form.
    """

    #: number of samples used when ``n`` is not given.
    default_n: int = 100

    @abstractmethod
    def sample_outputs(self, x: Tensor, n: int | None = None) -> Tensor:
        """``[n, B, D]`` model outputs for the ``B`` inputs ``x``, before the L2 normalisation."""

    @torch.no_grad()
    def sample(self, x: Tensor, n: int | None = None) -> Tensor:
        """``[n, B, D]`` unit-norm embedding samples for the ``B`` inputs ``x``."""
        check_inputs(x)
        return torch.nn.functional.normalize(self.sample_outputs(x, n), dim=-1)

    @torch.no_grad()
    def predict(self, x: Tensor, n: int | None = None, return_samples: bool = False) -> Prediction:
        """Mean, per-dimension std, ``output_var`` (and optionally the samples) of the embeddings of ``x``."""
        check_inputs(x)
        return Prediction.from_outputs(self.sample_outputs(x, n), keep_samples=return_samples)

    def __call__(self, x: Tensor, n: int | None = None, return_samples: bool = False) -> Prediction:
        return self.predict(x, n=n, return_samples=return_samples)

    def _n(self, n: int | None) -> int:
        n = self.default_n if n is None else int(n)
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        return n


@torch.no_grad()
def eval_forward(model: nn.Module, x: Tensor) -> Tensor:
    """``[B, D]`` outputs of ``model`` on ``x`` in eval mode (modes restored), flattened."""
    with eval_mode(model):
        return model(x.to(model_device(model))).flatten(1)


def normalized_forward(model: nn.Module, x: Tensor) -> Tensor:
    """``[B, D]`` unit-norm embeddings of ``x`` by ``model`` in eval mode (modes restored)."""
    return torch.nn.functional.normalize(eval_forward(model, x), dim=-1)


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


class InputScale(nn.Module):
    """Divides its input by a fixed positive scalar, ``scale`` (a buffer, saved with the head).

    The default variance head starts with it; :meth:`VarianceHeadBaseline._prepare_head`
    sets ``scale`` to the root mean square of the features of the training images. A head
    with the default initialisation and learning rate then sees features of order one
    whatever the frozen model's scale: networks trained with a large learning rate on a
    scale-invariant loss have features of order 10²–10³, on which an unscaled head's
    ``exp(log sigma^2)`` overflows in its first step.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return x / self.scale


def variance_head(in_features: int, out_features: int, hidden: int = 64, input_scale: float = 1.0) -> nn.Sequential:
    """The default head predicting per-dimension ``log sigma^2``:
    ``InputScale(input_scale) Linear ReLU Linear``."""
    return nn.Sequential(
        InputScale(input_scale), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features)
    )


def feature_scale(features: Tensor) -> float:
    """Root mean square of ``features`` ``[N, F]`` (in float64, so that large features do not
    overflow), or 1 when they are all zero or not finite."""
    rms = float(features.double().pow(2).mean().sqrt())
    return rms if math.isfinite(rms) and rms > 0 else 1.0


def positive_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Index pairs ``(i, j)``, ``i < j``, of same-label examples of a batch."""
    i, j = torch.triu_indices(labels.numel(), labels.numel(), offset=1, device=labels.device)
    keep = labels[i] == labels[j]
    return i[keep], j[keep]


class VarianceHeadBaseline(UncertaintyBaseline):
    """An embedder plus a head predicting the per-dimension ``log sigma^2`` of its embedding.

    The part shared by :class:`~lam_study.baselines.PFE` and
    :class:`~lam_study.baselines.HIB`: the attributes below, building the default head,
    and Gaussian sampling ``normalise(mu + sigma * eps)`` from :meth:`mean_log_var`.
    Subclasses define :meth:`mean_log_var` and their own ``fit``.

    Args:
        model: the embedder producing ``mu``.
        head: module mapping ``feature_fn(x)`` to ``[B, D]`` log-variances; default
            :func:`variance_head`, built at the first ``fit`` (see :meth:`_prepare_head`).
        feature_fn: the head's input; default :func:`default_feature_fn`.
        hidden: width of the default head.
        n: default number of samples.
        seed: when given, sampling noise is drawn from the global RNG seeded with it (its
            state restored afterwards).
    """

    #: the method's name, in error messages and progress bars.
    method_name: str = "variance head"

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

    @abstractmethod
    def mean_log_var(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``mu`` ``[B, D]`` and ``log sigma^2`` ``[B, D]`` of ``x``."""

    def _require_head(self) -> nn.Module:
        if self.head is None:
            raise RuntimeError(f"{self.method_name} has no variance head yet: call fit() first or pass head=")
        return self.head

    def _prepare_head(self, images: Tensor, device: torch.device) -> nn.Module:
        """The head, on ``device``; the default one is built first if there is none yet.

        The default head's sizes, and its input scale (:class:`InputScale`, the root mean
        square of the features), come from the features and embedding of the first
        ``_SCALE_EXAMPLES`` images (in batches of ``_SCALE_BATCH``), computed with the model in eval mode
        under ``no_grad`` (modes restored).
        """
        if self.head is None:
            with torch.no_grad(), eval_mode(self.model):
                n = min(images.shape[0], _SCALE_EXAMPLES)
                feats = torch.cat(
                    [
                        self.feature_fn(images[i : i + _SCALE_BATCH].to(device)).flatten(1)
                        for i in range(0, n, _SCALE_BATCH)
                    ]
                )
                dim = self.model(images[:2].to(device)).flatten(1).shape[1]
            self.head = variance_head(feats.shape[1], dim, self.hidden, input_scale=feature_scale(feats))
        return self.head.to(device)

    def _draw(self, mu: Tensor, sigma: Tensor, n: int) -> Tensor:
        """``[n, B, D]`` samples ``mu + sigma * eps`` (before normalisation), the noise seeded with :attr:`seed`."""
        with seeded(self.seed, mu.device):
            eps = torch.randn((n, *mu.shape), device=mu.device, dtype=mu.dtype)
        return mu + sigma * eps

    @torch.no_grad()
    def sample_outputs(self, x: Tensor, n: int | None = None) -> Tensor:
        mu, log_var = self.mean_log_var(x)
        return self._draw(mu, (0.5 * log_var).exp(), self._n(n))

    @flush_denormals()
    def _fit_batches(
        self,
        n_examples: int,
        batch_loss: Callable[[Tensor], Tensor | None],
        params: Iterable[Tensor],
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        progress: bool,
    ) -> TrainingHistory:
        """Minimise ``batch_loss(idx)`` over ``params`` with Adam, ``epochs`` passes of shuffled batches.

        Each epoch visits the ``n_examples`` examples in an order drawn from a
        ``torch.Generator`` seeded with ``seed``; ``batch_loss`` gets the ``[b]`` CPU
        indices of one batch and gathers what it needs itself (inputs, or features computed
        once). Batches whose loss is ``None`` are skipped; an epoch without any step
        records ``nan``. Module modes and the global RNG are left to the caller's ``fit``.

        Raises:
            FloatingPointError: a batch loss is not finite (the head diverged), before
                that step is taken.
            ValueError: ``epochs > 0`` and no batch gave a loss, so nothing was trained.
        """
        opt = torch.optim.Adam(params, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        history = TrainingHistory()
        for epoch in tqdm(range(epochs), desc=self.method_name, disable=not progress):
            order = torch.randperm(n_examples, generator=generator)
            total, steps = 0.0, 0
            for start in range(0, n_examples, batch_size):
                loss = batch_loss(order[start : start + batch_size])
                if loss is None:
                    continue
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{self.method_name}: the training loss is {float(loss.detach())} at epoch {epoch}, batch "
                        f"{start // batch_size}: the variance head diverged. Try a smaller lr (got {lr:g}); "
                        "features of a very large scale from the frozen model can cause this."
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.batch_losses.append(float(loss.detach()))
                total += history.batch_losses[-1]
                steps += 1
            history.epoch_losses.append(total / steps if steps else float("nan"))
        if epochs > 0 and not history.batch_losses:
            raise ValueError(
                f"{self.method_name}: no batch of {batch_size} had a pair to learn from (two items with one "
                "label), so nothing was trained; use larger batches or data whose labels repeat"
            )
        return history
