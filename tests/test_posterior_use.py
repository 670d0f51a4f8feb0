"""Using a fitted posterior: summaries of batches and loaders, batches as loaders give
them, float64 files, and a model changed after the fit."""

from __future__ import annotations

import pytest
import torch
from reference_models import NormMLP
from torch import nn

from lam_plugin import EmbeddingPosterior, LaplaceEmbedder


def _fitted(dtype: torch.dtype = torch.float32) -> tuple[EmbeddingPosterior, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = NormMLP(10, 4).to(dtype)
    x, y = torch.randn(24, 10, dtype=dtype), torch.arange(24) % 3
    return LaplaceEmbedder(model, subset="all", prior_precision=0.1, progress=False).fit([(x, y)]), x, y


def _quantiles(unc: torch.Tensor) -> list[float]:
    return torch.quantile(unc.float(), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])).tolist()


def test_summary_of_a_batch_and_of_the_first_batches_of_a_loader():
    post, x, y = _fitted()
    torch.manual_seed(1)
    expected = _quantiles(post.predict(x[:8]).uncertainty)
    for batch in ((x[:8], y[:8]), [x[:8], y[:8]], x[:8]):
        torch.manual_seed(1)
        assert list(post.summary(batch).uncertainty_quantiles.values()) == pytest.approx(expected)
    # a loader: its first max_batches batches, all under the same weight samples
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    torch.manual_seed(1)
    expected = _quantiles(post.predict(x[:16]).uncertainty)
    torch.manual_seed(1)
    got = post.summary(loader, max_batches=2).uncertainty_quantiles
    assert list(got.values()) == pytest.approx(expected)


class _Keywords(nn.Module):
    """A dict model that takes only its own keys (an unexpected ``labels`` would fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = NormMLP(10, 4)

    def forward(self, x: torch.Tensor, modality: str = "text") -> torch.Tensor:
        return self.net(x)


def test_dict_batches_with_labels_and_non_tensor_entries():
    torch.manual_seed(0)
    model = _Keywords()
    x, y = torch.randn(24, 10), torch.arange(24) % 3
    # a non-tensor entry first: the batch size comes from the first tensor
    post = LaplaceEmbedder(model, subset="all", progress=False).fit([{"modality": "text", "x": x, "labels": y}])
    g = torch.Generator().manual_seed(0)
    expected = post.sample({"x": x[:12]}, n=3, generator=g)
    # two labelled dict batches in a list: the labels never reach the model
    batches = [{"modality": "text", "x": x[:6], "labels": y[:6]}, {"modality": "text", "x": x[6:12], "labels": y[6:12]}]
    got = post.sample(batches, n=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, expected)


def test_a_float64_posterior_file_gives_the_same_samples(tmp_path):
    post, x, _ = _fitted(torch.float64)
    post.save(tmp_path / "p.safetensors")
    loaded = EmbeddingPosterior.load(tmp_path / "p.safetensors", post.model)
    assert loaded.prior_precision == post.prior_precision == 0.1
    assert torch.equal(loaded.precision, post.precision)
    g = [torch.Generator().manual_seed(3) for _ in range(2)]
    assert torch.equal(loaded.sample(x[:5], n=4, generator=g[0]), post.sample(x[:5], n=4, generator=g[1]))


def test_a_model_converted_after_the_fit_is_refused_by_name():
    post, x, _ = _fitted()
    post.model.double()
    with pytest.raises(ValueError, match=r"parameters are torch.float64 now, the posterior was fitted in torch.float32"):
        post.sample(x.double(), n=2)


def test_non_finite_curvature_is_refused(tmp_path):
    post, _, _ = _fitted()
    bad = post.curvature.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="curvature holds NaN or infinite values"):
        EmbeddingPosterior(post.model, post.param_names, bad, 1.0)
    mean = post.mean.clone()
    mean[0] = float("inf")
    with pytest.raises(ValueError, match="mean holds NaN or infinite values"):
        EmbeddingPosterior(post.model, post.param_names, post.curvature, 1.0, mean=mean)


def test_calibration_passes_over_temperatures_out_of_a_float16_range(caplog):
    from lam_plugin.calibration import calibrate_temperature

    post, x, y = _fitted()
    model = NormMLP(10, 4)
    model.load_state_dict(post.model.state_dict())
    half = EmbeddingPosterior(model.half(), post.param_names, post.curvature.half(), 1.0, config=post.config)
    calibrated, report = calibrate_temperature(half, x.half(), y, n=4, temperatures=[1e-4, 1.0, 100.0])
    assert 1e-4 not in report.scores and report.temperature in (1.0, 100.0)
    assert calibrated.mean.dtype == torch.float16
    assert any("temperature 0.0001 passed over" in r.getMessage() for r in caplog.records)
