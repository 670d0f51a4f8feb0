"""The embedding posterior: a diagonal Gaussian over a parameter subset.

``theta ~ N(theta*, diag(precision)^-1)`` with
``precision = hessian_scale * curvature + prior_precision`` (docs/design.md §1). Each
weight sample gives one embedding per input; their spread is the uncertainty.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from . import _posterior_file, distributed
from ._batches import is_one_batch, iter_inputs
from ._parameters import fingerprint, flatten, unflatten
from .calling import Batch, ModelCall, OutputKey
from .curvature.last_layer import HeadMismatchError, apply_head, head_holds, run_with_features
from .prediction import Prediction
from .records import FitStats, PosteriorConfig, PosteriorSummary
from .wrapping import batch_size as batch_size_of
from .wrapping import eval_mode, prepare_inputs, slice_batch

__all__ = ["EmbeddingPosterior", "FitStats", "PosteriorConfig", "PosteriorSummary"]

logger = logging.getLogger(__name__)

#: floats of weight samples held at once while sampling (:meth:`EmbeddingPosterior.weight_chunks`)
_WEIGHT_FLOATS = 1 << 24


class EmbeddingPosterior:
    """Diagonal Laplace posterior over a subset of a model's weights.

    Attributes:
        curvature: ``[P]`` contrastive GGN diagonal summed over the fit (no prior, no scale),
            in ``named_parameters()`` order over ``param_names``.
        param_names: the parameters it covers.
        mean: ``[P]`` the weights ``theta*`` it was fitted at.
        prior_precision: scalar or ``[P]``.
    """

    def __init__(
        self,
        model: nn.Module,
        param_names: list[str],
        curvature: Tensor,
        prior_precision: float | Tensor,
        *,
        mean: Tensor | None = None,
        config: PosteriorConfig | None = None,
        stats: FitStats | None = None,
    ) -> None:
        self.model = model
        self.param_names = list(param_names)
        self.mean = flatten(model, self.param_names) if mean is None else mean.detach().clone()
        if curvature.shape != self.mean.shape:
            raise ValueError(
                f"curvature has shape {tuple(curvature.shape)}, the subset has {self.mean.numel()} parameters"
            )
        self.curvature = curvature.detach().to(self.mean)
        for name, t in (("curvature", self.curvature), ("mean", self.mean)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"the posterior's {name} holds NaN or infinite values")
        self.prior_precision = _check_prior(prior_precision, self.mean)
        self.config = config or PosteriorConfig()
        self.stats = stats or FitStats()
        self._moved_warned = False
        self._vmap_ok = True

    @property
    def model_call(self) -> ModelCall:
        """How the model is called and its embedding taken."""
        return ModelCall(self.config.output_key, self.config.call)  # type: ignore[arg-type]

    # -- the Gaussian -------------------------------------------------------------------
    @property
    def precision(self) -> Tensor:
        """``[P]`` posterior precision: ``hessian_scale * curvature + prior_precision``.

        A negative curvature entry (possible only with ``approx="pos"`` in the arccos
        geometry, whose pair Hessian is indefinite) contributes zero.
        """
        return self.config.hessian_scale * self.curvature.clamp_min(0) + self.prior_precision

    @property
    def std(self) -> Tensor:
        """``[P]`` posterior standard deviation of each weight."""
        return self.precision.rsqrt()

    def sample_weights(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n, P]`` weight samples ``theta* + eps / sqrt(precision)``, ``eps ~ N(0, I)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        dev = generator.device if generator is not None else self.mean.device
        eps = torch.randn(n, self.mean.numel(), generator=generator, dtype=self.mean.dtype, device=dev)
        return self.mean + eps.to(self.mean.device) * self.std

    def weight_chunks(self, n: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """The ``n`` weight samples of :meth:`sample_weights` in chunks ``[c, P]`` of at most
        ``2**24`` floats together, drawn one chunk after another from ``generator``, so
        that a posterior over many parameters never holds ``[n, P]`` at once. Where
        ``n * P`` fits in one chunk they are exactly ``sample_weights(n, generator)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        step = max(1, min(n, _WEIGHT_FLOATS // max(1, self.mean.numel())))
        for start in range(0, n, step):
            yield self.sample_weights(min(step, n - start), generator)

    # -- embeddings ---------------------------------------------------------------------
    def sample(
        self,
        x: Batch | Iterable[Any],
        n: int = 30,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """``[n, B, D]`` embedding samples of ``x``, unit norm when ``normalize``.

        ``x`` is a batch (a tensor, a dict of tensors, or a labelled batch whose inputs are
        taken) or a loader of batches; every batch is embedded with the same ``n`` weight
        samples. A last-layer posterior with a parameter-free head runs the backbone once
        whatever ``n``; other subsets batch the forwards with ``vmap`` (``chunk_size`` of
        them at a time, default all), or loop over the samples where ``vmap`` cannot run
        the model (Hugging Face models). ``batch_size`` embeds each batch in pieces of that
        many items.
        """
        out = torch.cat(list(self._sample_outputs(x, n, generator, chunk_size, batch_size)), dim=1)
        return torch.nn.functional.normalize(out, dim=-1) if self.config.normalize else out

    def _sample_outputs(
        self,
        data: Batch | Iterable[Any],
        n: int,
        generator: torch.Generator | None,
        chunk_size: int | None,
        batch_size: int | None,
    ) -> Iterator[Tensor]:
        """``[n, b, D]`` model outputs, before any normalisation, of each piece of ``data``
        (its batches, cut to ``batch_size``), all under the same ``n`` weight samples.

        The generator is rewound to its starting state for every piece, so the weight
        samples are drawn again rather than kept: memory holds one chunk of them
        (:meth:`weight_chunks`) and one piece of outputs.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if generator is None:  # seeded from the global RNG, so torch.manual_seed decides
            generator = torch.Generator(self.mean.device).manual_seed(int(torch.randint(2**62, ())))
        start = generator.get_state()
        self._check_model_placement()
        self._warn_if_moved()
        empty = True
        with eval_mode(self.model):
            for batch in iter_inputs(data):
                x = prepare_inputs(batch, self.model)
                size = batch_size_of(x)
                step = size if batch_size is None else batch_size
                for i in range(0, size, step):
                    piece = slice_batch(x, i, i + step)
                    generator.set_state(start)
                    yield torch.cat([self._embed(piece, w, chunk_size) for w in self.weight_chunks(n, generator)])
                    empty = False
        if empty:
            raise ValueError("the inputs hold no batch")

    def _check_model_placement(self) -> None:
        """Refuse a model whose subset is no longer in the dtype or on the device of the fit
        (``model.double()``, ``model.to("cuda")`` after it), saying what to do."""
        param = dict(self.model.named_parameters())[self.param_names[0]]
        if param.dtype != self.mean.dtype:
            raise ValueError(
                f"the model's parameters are {param.dtype} now, the posterior was fitted in {self.mean.dtype}: "
                "convert the model back, or refit"
            )
        if param.device != self.mean.device:
            raise ValueError(
                f"the model is on {param.device} now, the posterior on {self.mean.device}: move the model back, "
                "or save the posterior and load it for the moved model (EmbeddingPosterior.load)"
            )

    def _warn_if_moved(self) -> None:
        """Log once when the model's weights in the subset are no longer the posterior's mean
        (the model was trained further after the fit): samples are still drawn around the
        mean, with the rest of the model as it is now. The backbone cannot be checked as
        cheaply; :meth:`fingerprint` covers the whole model."""
        if self._moved_warned:
            return
        if not torch.equal(flatten(self.model, self.param_names).to(self.mean), self.mean):
            self._moved_warned = True
            logger.warning(
                "the model's weights in the posterior's subset have changed since the fit; samples are drawn "
                "around the fitted weights, with the rest of the model as it is now. Refit after training"
            )

    def _embed(self, x: Batch, weights: Tensor, chunk_size: int | None) -> Tensor:
        """``[n, B, D]`` model outputs of ``x`` under the weight samples ``[n, P]``."""
        if self.config.head is not None:
            fast = self._sample_last_layer(x, weights)
            if fast is not None:
                return fast
        params = unflatten(weights, self.model, self.param_names)
        call = self.model_call

        def embed(p: dict[str, Tensor]) -> Tensor:
            return call.functional(self.model, p, x)

        with torch.no_grad():
            if self._vmap_ok:
                try:
                    return vmap(embed, chunk_size=chunk_size)(params)
                except RuntimeError as err:  # data-dependent control flow (Hugging Face attention, ...)
                    logger.info("vmap cannot run this model (%s); sampling one weight sample at a time", err)
                    self._vmap_ok = False
            return torch.stack([embed({k: v[s] for k, v in params.items()}) for s in range(weights.shape[0])])

    def tempered(self, temperature: float) -> EmbeddingPosterior:
        """The same posterior with its covariance multiplied by ``temperature``.

        Both terms of the precision are divided by it, so the balance between data and
        prior is kept: ``precision' = (hessian_scale * curvature + prior) / temperature``.
        """
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        config = replace(self.config, hessian_scale=self.config.hessian_scale / temperature)
        tempered = EmbeddingPosterior(
            self.model,
            self.param_names,
            self.curvature,
            self.prior_precision / temperature,
            mean=self.mean,
            config=config,
            stats=self.stats,
        )
        precision = tempered.precision
        if not bool(torch.isfinite(precision).all() and (precision > 0).all()):
            raise ValueError(
                f"temperature {temperature!r} takes the precision out of the range of {precision.dtype} "
                "(it overflows or underflows)"
            )
        return tempered

    def _sample_last_layer(self, x: Batch, weights: Tensor) -> Tensor | None:
        """The outputs from one forward pass and the sampled last layer, or None where the
        model output does not follow from that layer by the head on this batch (an
        elementwise nonlinearity after it, say): the general path then samples them."""
        layer = dict(self.model.named_modules())[self.config.layer]
        try:
            feats, u, out = run_with_features(self.model, layer, x, self.model_call)
        except HeadMismatchError:  # the layer ran more than once
            return None
        if not head_holds(u, out, self.config.head):  # type: ignore[arg-type]
            logger.debug("the head does not hold on this batch; sampling through the whole model")
            return None
        params = unflatten(weights, self.model, self.param_names)
        w = params[f"{self.config.layer}.weight"]
        u_s = torch.einsum("bi,noi->nbo", feats, w)
        bias = params.get(f"{self.config.layer}.bias")
        if bias is not None:
            u_s = u_s + bias[:, None, :]
        return apply_head(u_s, self.config.head)  # type: ignore[arg-type]

    def predict(
        self,
        x: Batch | Iterable[Any],
        n: int = 30,
        generator: torch.Generator | None = None,
        return_samples: bool = False,
        batch_size: int | None = None,
    ) -> Prediction:
        """Mean (unit norm), per-dimension std and ``uncertainty = sum_d std`` of ``n`` samples.

        ``x`` is a batch or a loader (as in :meth:`sample`): a loader is streamed, every
        batch with the same weight samples, and the result covers all its items.

        The prediction also carries ``output_var``, the ``[B, D]`` sample variance of the
        model output before the posterior's L2 normalisation (``normalize=True``, the
        ``arccos`` geometry); for a model that normalises itself it is the variance of the
        embedding. Its sum over ``D`` is a second out-of-distribution score
        (:attr:`Prediction.output_uncertainty`) that, unlike ``std``, keeps the spread along
        the output's direction.
        """
        if isinstance(n, int) and not isinstance(n, bool) and n < 2:
            raise ValueError(f"predict needs n >= 2 samples for a standard deviation, got n={n}")
        return Prediction.concat(
            [
                Prediction.from_outputs(out, keep_samples=return_samples, normalize=self.config.normalize)
                for out in self._sample_outputs(x, n, generator, None, batch_size)
            ]
        )

    # -- diagnostics --------------------------------------------------------------------
    def summary(self, data: Iterable[Any] | Tensor | None = None, n: int = 30, max_batches: int = 20) -> PosteriorSummary:
        """How much of the precision comes from the data, the pair counts of the fit, and,
        given ``data`` (a batch, or a loader of batches of which the first ``max_batches``
        are taken), the spread of the uncertainty."""
        data_part = self.config.hessian_scale * self.curvature.clamp_min(0)
        share = (data_part / self.precision).float()
        prior = self.prior_precision
        quantiles = None
        if data is not None:
            unc = self._uncertainties(data, n, max_batches)
            qs = torch.quantile(unc.float().cpu(), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))
            quantiles = dict(zip(["min", "p10", "median", "p90", "max"], qs.tolist()))
        return PosteriorSummary(
            n_params=self.mean.numel(),
            prior_precision=float(prior.mean()) if isinstance(prior, Tensor) else float(prior),
            hessian_scale=self.config.hessian_scale,
            data_share_mean=float(share.mean()),
            data_share_median=float(share.median()),
            params_data_dominated=float((share > 0.5).float().mean()),
            curvature_median=float(self.curvature.float().median()),
            curvature_max=float(self.curvature.max()),
            stats=self.stats,
            uncertainty_quantiles=quantiles,
        )

    def _uncertainties(self, data: Iterable[Any] | Tensor, n: int, max_batches: int) -> Tensor:
        """``[N]`` uncertainties of a batch, or of the first ``max_batches`` batches of a
        loader, every batch under the same ``n`` weight samples."""
        if not is_one_batch(data) and isinstance(data, Iterable):
            data = itertools.islice(data, max_batches)
        return self.predict(data, n=n).uncertainty

    # -- persistence --------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Identifies this posterior: the model's weights and the precision."""
        h = hashlib.sha256(fingerprint(self.model).encode())
        h.update(self.precision.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (tensors plus JSON metadata; nothing executable; see
        :mod:`lam_plugin.file_format`)."""
        _posterior_file.write(path, self)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, output_key: OutputKey = None) -> EmbeddingPosterior:
        """Read a file written by :meth:`save` for ``model``; refuse one made for another model.

        ``model`` may be wrapped in ``DataParallel`` / ``DistributedDataParallel`` as it was
        for the fit: the posterior covers the module inside (:func:`distributed.unwrap`).
        ``output_key``: the callable that took the embedding from the output, when the
        posterior was fitted with one (files record only its name).
        """
        model = distributed.unwrap(model)
        names, curvature, prior, mean, config, stats = _posterior_file.read(path, model, output_key)
        return cls(model, names, curvature, prior, mean=mean, config=config, stats=stats)

    def __repr__(self) -> str:
        return (
            f"EmbeddingPosterior(params={self.mean.numel()}, geometry={self.config.geometry!r}, "
            f"approx={self.config.approx!r}, backend={self.stats.backend!r})"
        )


def _check_prior(prior: float | Tensor, mean: Tensor) -> float | Tensor:
    if isinstance(prior, Tensor):
        if prior.numel() == 1:
            prior = float(prior)
        elif prior.shape != mean.shape:
            raise ValueError(f"prior_precision must be a scalar or [P]={mean.numel()}, got {tuple(prior.shape)}")
        else:
            if not (torch.isfinite(prior).all() and (prior > 0).all()):
                raise ValueError("prior_precision must be positive and finite")
            return prior.to(mean)
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not math.isfinite(prior) or prior <= 0:
        raise ValueError(f"prior_precision must be a positive finite number (or 'marglik'), got {prior!r}")
    return float(prior)
