"""Extension points as objects: backends by name, class, instance or registration, and
geometries by name or object, all giving the curvature their names give."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lam_plugin import L2Normalize, LaplaceEmbedder
from lam_plugin.calling import ModelCall
from lam_plugin.curvature import BACKENDS, CurvatureBackend, FunctorchBackend, register_backend
from lam_plugin.geometry import ArccosGeometry, EuclideanGeometry, Geometry, LowRankBlocks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), L2Normalize())


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(9, 6, generator=g), torch.arange(9) % 3) for _ in range(2)]


def _fit(**kwargs):
    return LaplaceEmbedder(_model(), subset="all", approx="pos", progress=False, **kwargs).fit(_data())


def test_a_backend_class_or_instance_gives_what_its_name_gives():
    by_name = _fit(backend="torch.func")
    by_class = _fit(backend=FunctorchBackend)
    torch.testing.assert_close(by_class.curvature, by_name.curvature)
    assert by_class.stats.backend == "torch.func"
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    instance = FunctorchBackend(model, ModelCall(), names, chunk_size=2)
    post = LaplaceEmbedder(model, subset="all", approx="pos", backend=instance, progress=False).fit(_data())
    torch.testing.assert_close(post.curvature, by_name.curvature)
    # the instance is the user's: a second fit uses it again
    again = LaplaceEmbedder(model, subset="all", approx="pos", backend=instance, progress=False).fit(_data())
    torch.testing.assert_close(again.curvature, by_name.curvature)


def test_an_instance_for_another_model_or_subset_is_refused():
    other = _model()
    instance = FunctorchBackend(other, ModelCall(), ["0.weight"])
    with pytest.raises(ValueError, match="covers another model or other parameters"):
        LaplaceEmbedder(_model(), subset="all", backend=instance, progress=False).fit(_data())


def test_a_registered_backend_is_used_by_its_name():
    calls: list[int] = []

    class Counting(FunctorchBackend):
        name = "counting"

        def batch(self, x, hessian_fn, params=None):
            calls.append(x.shape[0])
            return super().batch(x, hessian_fn, params)

    register_backend("counting", Counting)
    try:
        post = _fit(backend="counting")
    finally:
        BACKENDS.pop("counting")
    assert calls == [9, 9] and post.stats.backend == "counting"
    torch.testing.assert_close(post.curvature, _fit(backend="torch.func").curvature)


@pytest.mark.parametrize("bad", ["jax", 3, nn.Linear])
def test_a_backend_that_is_none_of_the_accepted_kinds_is_refused(bad):
    with pytest.raises(ValueError, match="backend must be 'auto', one of"):
        LaplaceEmbedder(_model(), backend=bad)


def test_register_backend_checks_its_arguments():
    with pytest.raises(TypeError, match="CurvatureBackend subclass"):
        register_backend("x", nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="other than 'auto'"):
        register_backend("auto", FunctorchBackend)
    assert issubclass(BACKENDS["hooks"], CurvatureBackend)


def test_a_geometry_object_gives_what_its_name_gives():
    for name, geometry in (("arccos", ArccosGeometry()), ("euclidean", EuclideanGeometry())):
        torch.testing.assert_close(_fit(geometry=geometry).curvature, _fit(geometry=name).curvature)
    with pytest.raises(ValueError, match="geometry must be one of"):
        LaplaceEmbedder(_model(), geometry="cosine")


class ScaledArccos(ArccosGeometry):
    """``c`` times the arccos loss: every block of the output Hessian scales by ``c``."""

    name = "scaled-arccos"

    def __init__(self, c: float) -> None:
        self.c = c

    def pair_blocks(self, a, b):
        return tuple(self.c * h for h in super().pair_blocks(a, b))

    def self_blocks(self, w, norm, e) -> LowRankBlocks:
        return super().self_blocks(self.c * w, norm, e)

    def cross_blocks(self, w_kl, norm_k, norm_l, e_k, e_l) -> LowRankBlocks:
        return super().cross_blocks(self.c * w_kl, norm_k, norm_l, e_k, e_l)


@pytest.mark.parametrize("backend", ["torch.func", "backpack", "hooks", "last_layer"])
def test_a_user_geometry_reaches_every_backend(backend):
    """A Geometry subclass is used by the dense path (torch.func, BackPACK) and the
    structured one (hooks, the closed form) alike: three times the loss, three times
    the curvature."""
    subset = "last_layer" if backend == "last_layer" else "all"
    kw = dict(subset=subset, approx="pos", backend=backend, progress=False)
    plain = LaplaceEmbedder(_model(), **kw).fit(_data())
    scaled = LaplaceEmbedder(_model(), geometry=ScaledArccos(3.0), **kw).fit(_data())
    assert float(plain.curvature.abs().max()) > 0
    torch.testing.assert_close(scaled.curvature, 3.0 * plain.curvature, rtol=1e-4, atol=1e-6)
    assert scaled.config.geometry == "scaled-arccos"
    assert isinstance(ScaledArccos(1.0), Geometry)
