"""Parameter subsets: which weights the posterior covers, and how they are flattened.

The flat vector ``theta`` over a subset is the concatenation of the flattened
parameters in ``model.named_parameters()`` order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .calling import Batch, ModelCall
from .curvature.base import FitTarget
from .curvature.last_layer import (
    Head,
    HeadMismatchError,
    capture_io,
    detect_head,
    head_holds,
    plain_linear_problem,
    run_with_features,
)
from .wrapping import eval_mode, head_of_batch

Subset = str | Sequence[str]

logger = logging.getLogger(__name__)

#: the last layer's weight and bias are multiplied by this in the probe of its head: an
#: elementwise function after the layer (a ReLU, abs, tanh, clamp) that acts as the
#: identity at the fitted weights does not survive a flipped sign and a larger scale,
#: which weight samples can reach
_HEAD_PROBE_SCALE = -8.0


def last_linear(model: nn.Module, example: Batch, call: ModelCall) -> str:
    """Name (as in ``named_modules``) of the last ``nn.Linear`` whose output the embedding
    depends on, in the order the forward pass runs them.

    "The last Linear that runs" is wrong for a BERT encoder (its pooler runs last, but a
    mean-pooled embedding does not use it) and for multi-head models (a classifier
    beside the embedding head). One autograd probe on ``example`` tells them apart: the
    gradient of a random projection of the embedding with respect to each Linear's
    output is non-zero only where the embedding uses that output. The weights are
    substituted by detached copies (``torch.func.functional_call``), so the model, its
    ``.grad`` and its hooks stay as they were.
    """
    outputs: list[tuple[str, Tensor]] = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out, name=name: outputs.append((name, out)))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    try:
        with eval_mode(model), torch.enable_grad():
            emb = call.functional(model, params, example)
    finally:
        for h in handles:
            h.remove()
    if not outputs:
        raise ValueError('subset="last_layer" needs an nn.Linear in the forward pass; none ran')
    candidates = [(name, out) for name, out in outputs if isinstance(out, Tensor) and out.requires_grad]
    grads: list[Tensor | None] = [None] * len(candidates)
    if emb.requires_grad and candidates:
        direction = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0), dtype=emb.dtype).to(emb.device)
        grads = list(torch.autograd.grad((emb * direction).sum(), [o for _, o in candidates], allow_unused=True))
    used = [name for (name, _), g in zip(candidates, grads) if g is not None and bool(g.ne(0).any())]
    if not used:
        ran = sorted({name for name, _ in outputs})
        raise ValueError(
            f"the embedding depends on no nn.Linear output (Linear layers that ran: {ran}); pass subset= "
            "as a module name or a list of parameter-name prefixes"
        )
    return used[-1]


def probe_last_layer(
    model: nn.Module, example: Batch, call: ModelCall, layer: str | None = None
) -> tuple[str, Head | None]:
    """The last layer (``layer``, or :func:`last_linear`) and the parameter-free head
    (identity or L2 normalisation) that maps its output to the embedding, None if none
    or if the layer is not a plain ``nn.Linear`` (:func:`plain_linear_problem`).

    The head is checked on all of ``example``, at the model's weights and with the
    layer's weight and bias scaled by ``-8`` (so that a function after the layer that
    only looks like the identity at these weights is found);
    :class:`LastLayerCurvature` checks it again on every batch it is given.
    """
    with eval_mode(model):
        name = layer if layer is not None else last_linear(model, example, call)
        module = dict(model.named_modules())[name]
        problem = plain_linear_problem(model, name)
        if problem is not None:
            logger.info("no closed form for layer %r: %s", name, problem)
            return name, None
        try:
            _, u, out = run_with_features(model, module, example, call)
        except HeadMismatchError:  # a layer run more than once: no head of one call's output
            return name, None
        head = detect_head(u, out)
        if head is None:
            return name, None
        scaled = {f"{name}.{k}": _HEAD_PROBE_SCALE * p.detach() for k, p in module.named_parameters(recurse=False)}
        with torch.no_grad(), capture_io(module) as io:
            out = call.functional(model, scaled, example)
    return name, head if head_holds(io["output"], out, head) else None


def resolve_subset(model: nn.Module, subset: Subset, last_layer: str | None = None) -> list[str]:
    """Parameter names covered by ``subset``, in ``named_parameters()`` order.

    ``subset`` is ``"all"``, ``"last_layer"`` (the parameters of the module named
    ``last_layer``, see :func:`last_linear`), the name of a module (its parameters), or a
    list of name prefixes. A module's parameters are named as ``named_parameters()``
    names them: a weight tied to an earlier module's by that module's name.
    """
    names = [n for n, _ in model.named_parameters()]
    if isinstance(subset, str):
        if subset == "all":
            chosen = names
        elif subset == "last_layer" and last_layer is None:
            raise ValueError('subset="last_layer" needs the name of the last linear layer')
        else:
            module = dict(model.named_modules()).get(last_layer if subset == "last_layer" else subset)
            ids = {id(p) for p in module.parameters()} if module is not None else set()
            chosen = [n for n, p in model.named_parameters() if id(p) in ids]
            if module is None or not chosen:
                raise ValueError(
                    f"subset={subset!r} is not 'all', 'last_layer' or the name of a module with parameters; "
                    f"modules with parameters are {_module_names(model)}"
                )
    else:
        prefixes = list(subset)
        if not prefixes or not all(isinstance(p, str) for p in prefixes):
            raise ValueError(f"subset as a list must hold parameter-name prefixes (str), got {subset!r}")
        unmatched = [p for p in prefixes if not any(_has_prefix(n, p) for n in names)]
        if unmatched:
            raise ValueError(f"subset prefixes {unmatched} match no parameter; parameters are {names}")
        chosen = [n for n in names if any(_has_prefix(n, p) for p in prefixes)]
    if not chosen:
        raise ValueError(f"subset={subset!r} selects no parameter")
    return chosen


def fit_target(model: nn.Module, subset: Subset, example: Batch, call: ModelCall) -> FitTarget:
    """The parameters of ``subset`` on the example batch, with the last layer and its head
    where the subset is ``"last_layer"`` or names an ``nn.Linear``.

    Calls the model on ``example`` first, so a model that cannot take the batch or
    returns no ``[B, D]`` embedding fails here, before any work.
    """
    names_given = isinstance(subset, str) and subset not in ("all", "last_layer")
    names = resolve_subset(model, subset) if subset != "last_layer" else None
    with eval_mode(model):
        if subset == "last_layer" or (names_given and isinstance(dict(model.named_modules())[subset], nn.Linear)):
            layer, head = probe_last_layer(model, example, call, None if subset == "last_layer" else str(subset))
            return FitTarget(resolve_subset(model, subset, layer), layer, head)
        assert names is not None
        check_affects_output(model, names, example, call)
    return FitTarget(names)


def check_affects_output(model: nn.Module, names: Sequence[str], example: Batch, call: ModelCall) -> None:
    """Raise ``ValueError`` unless some parameter in ``names`` changes the model output.

    One forward and backward pass on (at most two items of) ``example``, in eval mode,
    through ``torch.func.functional_call``: the model's weights and ``.grad`` stay as
    they are.
    """
    wanted = set(names)
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters() if n in wanted}
    with eval_mode(model), torch.enable_grad():
        out = call.functional(model, params, head_of_batch(example, 2))
        used = out.requires_grad and any(
            g is not None for g in torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True)
        )
    if not used:
        shown = ", ".join(list(names)[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(
            f"the posterior's parameters ({shown}) do not affect the model output: the forward pass never "
            "uses them; choose a subset that it does"
        )


def _module_names(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    shown = ", ".join(repr(n) for n in names[-limit:])
    return ("..., " if len(names) > limit else "") + shown


def _has_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def flatten(model: nn.Module, names: Sequence[str]) -> Tensor:
    """The flat ``[P]`` vector of the named parameters (detached)."""
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


def unflatten(flat: Tensor, model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """Split ``[..., P]`` into ``{name: [..., *shape]}`` (leading dims kept)."""
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    offset = 0
    lead = flat.shape[:-1]
    for n in names:
        shape = params[n].shape
        k = params[n].numel()
        out[n] = flat[..., offset : offset + k].reshape(*lead, *shape)
        offset += k
    if offset != flat.shape[-1]:
        raise ValueError(f"flat vector has {flat.shape[-1]} entries, the parameters {offset}")
    return out


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and values of all parameters and buffers."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def architecture(model: nn.Module) -> dict[str, list[int]]:
    """``{name: shape}`` of all parameters: what must match for a saved posterior to fit."""
    return {n: list(p.shape) for n, p in model.named_parameters()}
