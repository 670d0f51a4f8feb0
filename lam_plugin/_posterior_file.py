"""Reading and writing an :class:`~lam_plugin.posterior.EmbeddingPosterior` file: its
tensors in safetensors, its settings and the model's architecture and fingerprint as
JSON metadata (:mod:`lam_plugin.file_format`); a file made for another model is refused."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import __version__, file_format
from ._parameters import architecture, fingerprint, flatten
from .calling import ModelCall, OutputKey
from .records import FitStats, PosteriorConfig
from .wrapping import model_device

if TYPE_CHECKING:
    from .posterior import EmbeddingPosterior

FORMAT = "lam-plugin/embedding-posterior"
FORMAT_VERSION = 1


def write(path: str | Path, posterior: EmbeddingPosterior) -> None:
    """Write ``posterior`` to ``path`` (:meth:`EmbeddingPosterior.save`)."""
    prior = posterior.prior_precision
    tensors = {
        "curvature": posterior.curvature.detach().cpu().contiguous(),
        "mean": posterior.mean.detach().cpu().contiguous(),
        "prior_precision": (prior if isinstance(prior, Tensor) else torch.tensor([prior], dtype=torch.float64)).detach().cpu().contiguous(),
    }
    meta = {
        "lam_plugin_version": __version__,
        "param_names": json.dumps(posterior.param_names),
        "architecture": json.dumps(architecture(posterior.model)),
        "model_fingerprint": fingerprint(posterior.model),
        "config": json.dumps(_config_record(posterior.config)),
        "stats": json.dumps(asdict(posterior.stats)),
    }
    file_format.write(path, tensors, meta, format_name=FORMAT, version=FORMAT_VERSION, framework="pt")


def read(
    path: str | Path, model: nn.Module, output_key: OutputKey
) -> tuple[list[str], Tensor, float | Tensor, Tensor, PosteriorConfig, FitStats]:
    """``(param_names, curvature, prior_precision, mean, config, stats)`` of a file written
    by :func:`write`, checked against ``model`` (:meth:`EmbeddingPosterior.load`)."""
    tensors, meta = file_format.read(
        path, format_name=FORMAT, version=FORMAT_VERSION, what="lam-plugin posterior", framework="pt"
    )
    saved_arch = json.loads(meta["architecture"])
    arch = architecture(model)
    if saved_arch != arch:
        diff = _arch_diff(saved_arch, arch)
        raise ValueError(f"{path} was made for another model architecture; differing parameters: {diff[:10]}")
    saved_dtype, model_dtype = tensors["mean"].dtype, flatten(model, json.loads(meta["param_names"])[:1]).dtype
    if saved_dtype != model_dtype:
        raise ValueError(
            f"{path} was fitted on a {saved_dtype} model; this model's parameters are {model_dtype}: "
            "convert the model back (e.g. model.float()), or refit"
        )
    if meta["model_fingerprint"] != fingerprint(model):
        raise ValueError(
            f"{path} was fitted on other weights than this model's (same architecture, different "
            "parameters or buffers); refit the posterior for this model"
        )
    names = json.loads(meta["param_names"])
    config = PosteriorConfig(**json.loads(meta["config"]))
    if config.output_fn is not None:
        if not callable(output_key):
            raise ValueError(
                f"{path} was fitted with output_key={config.output_fn} (a callable); pass that callable "
                "as EmbeddingPosterior.load(path, model, output_key=...)"
            )
        config = replace(config, output_key=output_key)
    elif output_key is not None and output_key != config.output_key:
        raise ValueError(f"{path} was fitted with output_key={config.output_key!r}, not {output_key!r}")
    stats = FitStats(**json.loads(meta["stats"]))
    prior = tensors["prior_precision"]
    dev = model_device(model)
    prior_value = float(prior[0]) if prior.numel() == 1 else prior.to(dev)
    return names, tensors["curvature"].to(dev), prior_value, tensors["mean"].to(dev), config, stats


def _config_record(config: PosteriorConfig) -> dict[str, Any]:
    """The configuration as JSON-safe values: a callable ``output_key`` by its name."""
    record = asdict(config)
    if callable(config.output_key):
        record["output_key"] = None
        record["output_fn"] = ModelCall(config.output_key).describe()
    return record


def _arch_diff(a: dict[str, list[int]], b: dict[str, list[int]]) -> list[str]:
    names = sorted(set(a) | set(b))
    return [f"{n}: {a.get(n)} vs {b.get(n)}" for n in names if a.get(n) != b.get(n)]
