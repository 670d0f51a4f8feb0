"""Curvature with BackPACK: square-root GGN factors, pair sums formed layer by layer.

``SqrtGGNExact`` with ``MSELoss(reduction="sum")`` on the stacked outputs gives, for
every parameter, the per-sample factors ``S = sqrt(2) J^T`` (``[D, B, *shape]``).
Inside BackPACK's ``extension_hook`` each module's factors are contracted with the
batch's output Hessian, ``diag(J^T G J) = diag(S^T G S) / 2``, and freed at once, so
the factors of the whole network never sit in memory together.

BackPACK works on a deep copy of the model, converted with ``use_converter=True``
(residual ``+``, ``flatten`` ... become modules) and in eval mode (BatchNorm is
supported only there). The user's model is never extended.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from backpack import backpack, extend
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.core.derivatives.convnd import ConvNDDerivatives
from backpack.custom_module.graph_utils import BackpackTracer
from backpack.extensions import SqrtGGNExact
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.fx import Graph

from ..calling import Batch, ModelCall
from ..modules import L2Normalize
from .base import CurvatureBackend, HessianFn, UnsupportedModelError, check_finite, flat_jacobian

__all__ = ["BackpackBackend", "ParameterFreeDerivatives", "backpack_support"]


_GRAPH_OPS_OK = {"placeholder", "output", "call_module", "get_attr"}


class ParameterFreeDerivatives(BaseDerivatives):
    """Transposed Jacobian of a parameter-free module at its stored input, by ``torch.func.vjp``.

    Covers the layers BackPACK's ``SqrtGGNExact`` table lacks: this library's
    ``L2Normalize`` (``J^T v = (v - (v.z) z)/||f||``) and adaptive average pooling
    (BackPACK's own pooling derivatives build float32 kernels and fail in float64).
    """

    def hessian_is_zero(self, module: nn.Module) -> bool:
        return False

    def _jac_t_mat_prod(
        self,
        module: nn.Module,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        mat: Tensor,
        subsampling: list[int] | None = None,
    ) -> Tensor:
        stored: Tensor = module.input0  # type: ignore[assignment]
        inp = stored if subsampling is None else stored[subsampling]
        _, pullback = vjp(module.forward, inp.detach())  # type: ignore[misc]
        return vmap(lambda m: pullback(m)[0])(mat)


class _ConvDerivatives(ConvNDDerivatives):
    """BackPACK's convolution derivatives with a faster per-sample weight Jacobian.

    BackPACK forms ``J^T mat`` for the weight of every sample by convolving ``V * N``
    repeated copies of the input (0.33 s of 0.69 s per batch of 64 on the paper's CNN);
    with BackPACK's unfolded input ``X [N, C_in*k*k, L]`` it is one contraction,
    ``[V, N, C_out, L] x [N, C_in*k*k, L] -> [V, N, C_out, C_in*k*k]``.
    """

    def _weight_jac_t_mat_prod(
        self,
        module: nn.Module,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        mat: Tensor,
        sum_batch: bool = True,
        subsampling: list[int] | None = None,
    ) -> Tensor:
        if module.groups != 1:
            return super()._weight_jac_t_mat_prod(module, g_inp, g_out, mat, sum_batch, subsampling)
        unfolded = self.get_unfolded_input(module)
        if subsampling is not None:
            unfolded = unfolded[subsampling]
        flat = mat.flatten(start_dim=3)
        shape = tuple(module.weight.shape)  # type: ignore[arg-type]
        if sum_batch:
            return torch.einsum("vnol,nil->voi", flat, unfolded).reshape(mat.shape[0], *shape)
        return torch.einsum("vnol,nil->vnoi", flat, unfolded).reshape(*mat.shape[:2], *shape)


_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_EXTRA_MODULES = (L2Normalize, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _extension() -> SqrtGGNExact:
    """``SqrtGGNExact`` extended to the parameter-free layers in ``_EXTRA_MODULES``."""
    ext = SqrtGGNExact()
    for cls in _EXTRA_MODULES:
        ext.set_module_extension(cls, SqrtGGNBaseModule(ParameterFreeDerivatives()))
    for conv, dims in _CONV_DIMS.items():
        ext.set_module_extension(conv, SqrtGGNBaseModule(_ConvDerivatives(dims), params=["bias", "weight"]), overwrite=True)
    return ext


def _supported_types(ext: SqrtGGNExact) -> tuple[type, ...]:
    # BackPACK keeps its module table private; read it to name an unsupported module
    # before any work is done instead of failing in the middle of a backward pass.
    table = getattr(ext, "_BackpropExtension__module_extensions", {})
    return tuple(table)


class _LeafTracer(BackpackTracer):
    """BackPACK's tracer, with this library's ``L2Normalize`` kept as one module."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, L2Normalize) or super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def _l2normalize_kept_whole() -> Iterator[None]:
    """BackPACK's converter with ``L2Normalize`` kept as one module.

    The converter (``extend(..., use_converter=True)``, which rewrites residual ``+``,
    ``flatten`` and the like into modules) traces with ``BackpackTracer`` and offers no way
    to name further leaf modules, so it would inline ``L2Normalize`` into a functional
    ``normalize`` that BackPACK cannot run. For the duration of the conversion only, the
    tracer's leaf test also accepts ``L2Normalize``."""
    original = BackpackTracer.is_leaf_module

    def is_leaf_module(tracer: BackpackTracer, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, L2Normalize) or original(tracer, m, module_qualified_name)

    BackpackTracer.is_leaf_module = is_leaf_module
    try:
        yield
    finally:
        BackpackTracer.is_leaf_module = original


def _unsupported(gm: nn.Module, graph: Graph) -> str | None:
    """Why BackPACK cannot run this graph exactly, or None."""
    supported = _supported_types(_extension())
    modules = dict(gm.named_modules())
    called: list[str] = []
    for node in graph.nodes:
        if node.op not in _GRAPH_OPS_OK:
            return f"operation {node.op} {getattr(node.target, '__name__', node.target)!s} in the forward"
        if node.op == "call_module":
            mod = modules[node.target]
            if supported and type(mod) not in supported:  # BackPACK looks modules up by their exact class
                return f"module {node.target!r} ({type(mod).__name__})"
            called.append(str(node.target))
    return _called_twice(called) or _shared_parameter(called, modules) or _conv_problem(called, modules)


def _called_twice(called: list[str]) -> str | None:
    """A module run more than once: BackPACK keeps the input of one call only."""
    twice = sorted({name for name in called if called.count(name) > 1})
    return f"module {twice[0]!r} run {called.count(twice[0])} times in the forward" if twice else None


def _shared_parameter(called: list[str], modules: dict[str, nn.Module]) -> str | None:
    """A parameter held by two modules that run (tied weights): BackPACK gives each module
    its own factor, and the two Jacobians must be summed before contracting."""
    owner: dict[int, str] = {}
    for name in dict.fromkeys(called):
        for p in modules[name].parameters(recurse=False):
            if id(p) in owner:
                return f"a parameter shared by modules {owner[id(p)]!r} and {name!r} (tied weights)"
            owner[id(p)] = name
    return None


def _conv_problem(called: list[str], modules: dict[str, nn.Module]) -> str | None:
    """Convolutions BackPACK's derivatives get wrong: padding other than zeros, and grouped
    ones padded ``"same"`` unevenly (an even kernel extent)."""
    for name in dict.fromkeys(called):
        mod = modules[name]
        if not isinstance(mod, nn.modules.conv._ConvNd):
            continue
        if mod.padding_mode != "zeros":
            return f"convolution {name!r} with padding_mode={mod.padding_mode!r}"
        uneven = any((k - 1) * d % 2 for k, d in zip(mod.kernel_size, mod.dilation))
        if mod.groups != 1 and mod.padding == "same" and uneven:
            return f"grouped convolution {name!r} padded 'same' unevenly (kernel {tuple(mod.kernel_size)})"
    return None


def _hooked_module(model: nn.Module) -> str | None:
    """The first module with forward hooks (its own or global), as a reason, or None."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global module forward hooks"
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"module {name!r} ({type(mod).__name__}) with forward hooks"
    return None


def backpack_support(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """An extended copy of ``model`` for BackPACK: ``(copy, None)``, or ``(None, reason)``.

    A model whose every operation is a supported module is extended as it is; one with
    functional operations (residual ``+``, ``flatten``, ...) goes through BackPACK's
    converter, and whatever still is not a supported module is named in ``reason``.
    BackPACK's derivatives are those of each module's own forward, so a model with hooks
    that can change what a module computes is refused too.
    """
    hooked = _hooked_module(model)
    if hooked is not None:
        return None, hooked
    try:
        net = copy.deepcopy(model).eval()
    except Exception as err:  # non-leaf tensors as attributes (old weight_norm, pruning), ...
        return None, f"a model that cannot be copied ({type(err).__name__}: {err})"
    try:
        graph = _LeafTracer().trace(net)
    except Exception as err:  # fx cannot trace data-dependent control flow, among others
        return None, f"a forward that torch.fx cannot trace ({type(err).__name__}: {err})"
    if all(node.op in _GRAPH_OPS_OK for node in graph.nodes):
        reason = _unsupported(net, graph)
        if reason:
            return None, reason
        # Extend exactly the modules the graph calls. BackPACK's own extend() hooks every
        # module it visits but its containers (Sequential, ...), so a container of the
        # user's own class would reach its backward hook and fail there for want of an
        # extension; unhooked, it is passed over as a Sequential is.
        modules = dict(net.named_modules())
        for node in graph.nodes:
            if node.op == "call_module":
                extend(modules[node.target])
        return net, None
    try:
        with _l2normalize_kept_whole():
            gm = extend(net, use_converter=True)
    except Exception as err:  # the converter refuses graphs it cannot rewrite
        return None, f"a forward that BackPACK's converter cannot rewrite ({type(err).__name__}: {err})"
    reason = _unsupported(gm, gm.graph)
    return (None, reason) if reason else (gm, None)


class BackpackBackend(CurvatureBackend):
    """Contrastive GGN diagonal from BackPACK's per-sample square-root factors."""

    name = "backpack"

    def __init__(
        self,
        model: nn.Module,
        call: ModelCall,
        param_names: Sequence[str],
        converted: nn.Module | None = None,
    ) -> None:
        super().__init__(model, call, param_names)
        if converted is None:
            converted, reason = backpack_support(model)
            if converted is None:
                raise UnsupportedModelError(f"BackPACK does not support {reason}")
        self.net = converted
        params = dict(self.net.named_parameters())
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise UnsupportedModelError(f"BackPACK's converter renamed or dropped parameters {missing}")
        self._name_of = {id(p): n for n, p in params.items() if n in set(self.param_names)}
        for p in self.net.parameters():
            p.requires_grad_(id(p) in self._name_of)
        self.loss = extend(nn.MSELoss(reduction="sum"))
        self.ext = _extension()

    def batch(self, x: Batch, hessian_fn: HessianFn) -> tuple[Tensor, Tensor]:
        parts: dict[str, Tensor] = {}
        with torch.enable_grad():
            out = self.call.embed(self.net, x)
            g = hessian_fn(out.detach())

            def contract(module: nn.Module) -> None:
                for p in module.parameters(recurse=False):
                    name = self._name_of.get(id(p))
                    factor = getattr(p, "sqrt_ggn_exact", None)
                    if name is None or factor is None:
                        continue
                    jac = flat_jacobian(factor.transpose(0, 1))
                    parts[name] = g.contract(jac) / 2.0
                    delattr(p, "sqrt_ggn_exact")

            loss = self.loss(out, torch.zeros_like(out))
            with backpack(self.ext, extension_hook=contract), warnings.catch_warnings():
                # inputs never require grad here; torch warns that full backward hooks
                # then fire on outputs only, which is all BackPACK needs
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        for p in self.net.parameters():
            p.grad = None
        # a parameter that the embedding does not depend on (a second head of a
        # dict-output model, say) gets no factor from BackPACK: its Jacobian is zero
        params = dict(self.net.named_parameters())
        diag = torch.cat([parts[n] if n in parts else torch.zeros_like(params[n]).reshape(-1) for n in self.param_names])
        return check_finite(diag, self.name), out.detach()

    @contextlib.contextmanager
    def _weights_at(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        """Bring the copy in step with the model (which may have been trained since, as in
        online LAM) and set the subset to ``params``; the user's model is not touched."""
        own = dict(self.net.named_parameters()) | dict(self.net.named_buffers())
        source = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        stale = [n for n in source if n not in own]
        if stale:
            raise UnsupportedModelError(
                f"BackPACK's converter renamed {stale[:3]}, so its copy of the model cannot follow the model's weights"
            )
        with torch.no_grad():
            for n, value in source.items():
                own[n].copy_(params.get(n, value))
        yield

    def close(self) -> None:
        self.net = None  # type: ignore[assignment]
