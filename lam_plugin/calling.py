"""How a model is called on a batch, and how its embedding is taken from the output.

A model is called the way its own library calls it (design.md §12):

* a tensor batch is ``model(x)``;
* a dict batch is ``model(x)`` when ``forward`` takes the dict as one argument
  (sentence-transformers modules: ``forward(features)``), and ``model(**x)`` when
  ``forward`` names the keys (Hugging Face ``AutoModel``: ``forward(input_ids=...,
  attention_mask=...)``). A pass-through wrapper, whose ``forward`` takes only ``(*args,
  **kwargs)`` (a user's wrapper, ``torch.compile``'s module, ``DataParallel``), is called
  as the module it wraps, its only child module, would be. ``convention="positional"`` or
  ``"keywords"`` overrides that choice.

The embedding ``[B, D]`` is taken from the output by ``output_key``:

* ``None``: the output itself when it is a tensor, or its ``"sentence_embedding"`` entry
  (sentence-transformers); anything else asks for an ``output_key``;
* a key (``out[key]`` for a dict or a ``ModelOutput``, ``getattr(out, key)`` for any
  other object), or an index into a tuple or list;
* a callable ``(output, inputs) -> [B, D]``, e.g. :func:`mean_pooling` of a Hugging Face
  encoder's ``last_hidden_state`` under the attention mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["CONVENTIONS", "SENTENCE_EMBEDDING", "Batch", "Convention", "ModelCall", "OutputFn", "OutputKey", "as_call", "convention_module", "mean_pooling", "takes_keywords"]

Batch = Tensor | Mapping[str, Any]
OutputFn = Callable[[Any, Batch], Tensor]
OutputKey = str | int | OutputFn | None
Convention = Literal["auto", "positional", "keywords"]
CONVENTIONS = ("auto", "positional", "keywords")

#: the output entry a sentence-transformers model puts its embedding in
SENTENCE_EMBEDDING = "sentence_embedding"

#: the parameter kinds of a pass-through ``forward(*args, **kwargs)``
_PASS_THROUGH = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}

#: what a model raises when a batch reaches it in the other convention (a dict where it
#: reads a tensor's ``.size()``, keywords where it wants one dict, Hugging Face's checks)
_WRONG_FORM_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError)


def mean_pooling(output: Any, inputs: Batch) -> Tensor:
    """``[B, D]`` mean of ``last_hidden_state [B, T, D]`` over the tokens that
    ``inputs["attention_mask"]`` keeps (all tokens when there is no mask).

    For a Hugging Face encoder: ``LaplaceEmbedder(AutoModel..., output_key=mean_pooling)``.
    """
    hidden = output["last_hidden_state"] if isinstance(output, Mapping) else getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise ValueError(f"mean_pooling needs an output with 'last_hidden_state', got {type(output).__name__}")
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


def takes_keywords(model: nn.Module, keys: list[str]) -> bool:
    """Whether ``model.forward`` names the keys of a dict batch (call it ``model(**x)``)
    rather than taking the dict as one argument (``model(x)``).

    Keywords when some key is a parameter of ``forward``; otherwise keywords only when
    ``forward`` has no positional parameter at all (just ``**kwargs``). The ``forward`` read
    is that of :func:`convention_module`: a pass-through wrapper's is its wrapped module's.
    """
    params = _parameters(convention_module(model))
    if params is None:  # a builtin or C forward: assume keyword inputs
        return True
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(k in named for k in keys):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return not positional


def convention_module(model: nn.Module) -> nn.Module:
    """The module whose ``forward`` signature decides how a dict batch is passed: ``model``,
    or, while ``forward`` takes only ``(*args, **kwargs)`` and the module has exactly one
    child (a pass-through wrapper: a user's wrapper, ``torch.compile``'s ``OptimizedModule``,
    ``DataParallel``), that child."""
    while True:
        params = _parameters(model)
        children = list(model.children())
        if params is None or len(children) != 1 or {p.kind for p in params} != _PASS_THROUGH:
            return model
        model = children[0]


def _parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of ``model.forward``, or None where they cannot be read."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class ModelCall:
    """Calls a model on a batch and takes its ``[B, D]`` embedding (module docstring).

    Attributes:
        output_key: how the embedding is taken from the output.
        convention: ``"auto"``, ``"positional"`` (``model(x)``) or ``"keywords"``
            (``model(**x)``, dict batches only).
    """

    output_key: OutputKey = None
    convention: Convention = "auto"

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"call must be one of {CONVENTIONS}, got {self.convention!r}")
        key = self.output_key
        if not (key is None or isinstance(key, (str, int)) or callable(key)) or isinstance(key, bool):
            raise TypeError(
                f"output_key must be a key, an index or a callable (output, inputs) -> [B, D], got {key!r}"
            )

    # -- calling ----------------------------------------------------------------------------
    def keywords(self, model: nn.Module, x: Batch) -> bool:
        """Whether ``x`` is passed as ``model(**x)``."""
        if not isinstance(x, Mapping):
            if self.convention == "keywords":
                raise TypeError("call='keywords' needs dict batches; this batch is a tensor")
            return False
        if self.convention != "auto":
            return self.convention == "keywords"
        return takes_keywords(model, list(x))

    def __call__(self, model: nn.Module, x: Batch) -> Any:
        """The model's raw output on ``x``. A dict batch is passed as a shallow copy:
        sentence-transformers modules write their outputs into the dict they are given,
        and the caller's batch must come back as it was."""
        try:
            if self.keywords(model, x):
                return model(**x)  # type: ignore[arg-type]
            return model(dict(x) if isinstance(x, Mapping) else x)
        except Exception as err:
            if not self._hints(x, err):
                raise
            raise TypeError(self._call_error(model, x, err)) from err

    def functional(self, model: nn.Module, params: Mapping[str, Tensor], x: Batch) -> Tensor:
        """The ``[B, D]`` embedding of ``x`` with ``params`` substituted into ``model``."""
        try:
            if self.keywords(model, x):
                out: Any = functional_call(model, dict(params), (), dict(x))
            else:
                out = functional_call(model, dict(params), (dict(x) if isinstance(x, Mapping) else x,))
        except Exception as err:
            if not self._hints(x, err):
                raise
            raise TypeError(self._call_error(model, x, err)) from err
        return self.embedding(out, x)

    def embed(self, model: nn.Module, x: Batch) -> Tensor:
        """``[B, D]``: the embedding of one forward pass."""
        return self.embedding(self(model, x), x)

    # -- the embedding ------------------------------------------------------------------------
    def embedding(self, out: Any, x: Batch) -> Tensor:
        """Take the ``[B, D]`` embedding out of the model output ``out`` for inputs ``x``."""
        key = self.output_key
        if callable(key):
            emb = key(out, x)
            where = f"output_key {getattr(key, '__name__', key)!r}"
        elif key is not None:
            emb = _take(out, key)
            where = f"output {key!r}"
        elif isinstance(out, Mapping) and SENTENCE_EMBEDDING in out:
            emb, where = out[SENTENCE_EMBEDDING], f"output {SENTENCE_EMBEDDING!r}"
        else:
            emb, where = out, "the model output"
        if not isinstance(emb, Tensor):
            raise TypeError(
                f"{where} is a {type(emb).__name__}, not a tensor; pass output_key= (a key, an index, or a "
                f"callable (output, inputs) -> [B, D] such as lam_plugin.mean_pooling){_keys_hint(out)}"
            )
        if emb.ndim != 2:
            raise ValueError(
                f"the embedding ({where}) must have shape [B, D], got {tuple(emb.shape)}{_keys_hint(out)}"
            )
        return emb

    def describe(self) -> str:
        """A JSON-safe description of ``output_key`` (a callable by its qualified name)."""
        key = self.output_key
        if callable(key):
            return f"{getattr(key, '__module__', '?')}.{getattr(key, '__qualname__', repr(key))}"
        return repr(key)

    def _hints(self, x: Batch, err: Exception) -> bool:
        """Whether the call's error ``err`` is re-raised with :meth:`_call_error`'s hint: a
        ``TypeError``, or, where the convention was chosen for a dict batch from ``forward``'s
        signature, any error a batch passed the other way raises (``_WRONG_FORM_ERRORS``).
        Other errors (``RuntimeError``: ``vmap``'s refusals, out of memory, the curvature
        backends' own signals) pass through as they are."""
        if isinstance(err, TypeError):
            return True
        return self.convention == "auto" and isinstance(x, Mapping) and isinstance(err, _WRONG_FORM_ERRORS)

    def _call_error(self, model: nn.Module, x: Batch, err: Exception) -> str:
        name, cause = type(model).__name__, f"{type(err).__name__}: {err}"
        if isinstance(x, Mapping):
            style = f"{name}(**batch)" if self.keywords(model, x) else f"{name}(batch)"
            chosen = " (chosen from the signature of forward)" if self.convention == "auto" else ""
            return (
                f"calling {style}{chosen} with batch keys {sorted(x)} failed: {cause}. Pass call='positional' "
                "(model(batch)) or call='keywords' (model(**batch)) to choose how the dict is passed"
            )
        return f"calling {name}(x) with a tensor of shape {tuple(x.shape)} failed: {cause}"


def _take(out: Any, key: str | int) -> Any:
    try:
        if isinstance(key, str) and not isinstance(out, Mapping):
            return getattr(out, key)
        return out[key]
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise ValueError(
            f"output_key={key!r} could not be taken from the model output of type {type(out).__name__}: "
            f"{err!r}{_keys_hint(out)}"
        ) from err


def _keys_hint(out: Any) -> str:
    if isinstance(out, Mapping):
        return f" (the output has keys {list(out)})"
    if isinstance(out, (tuple, list)):
        return f" (the output is a {type(out).__name__} of {len(out)})"
    return ""


def as_call(call: ModelCall | OutputKey) -> ModelCall:
    """A :class:`ModelCall` from one, or from a bare ``output_key``."""
    return call if isinstance(call, ModelCall) else ModelCall(call)

