"""How the library talks to a user's model: inputs, output selection, modes.

Everything here leaves the user's model as it was: modes are restored on exit and
no hooks or attributes stay behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

Batch = Union[Tensor, Mapping[str, Tensor]]
OutputKey = Union[str, int, None]


def select_output(out: Any, output_key: OutputKey) -> Tensor:
    """Pick the embedding ``[B, D]`` out of a model's output (tensor, dict or tuple)."""
    if output_key is not None:
        try:
            out = out[output_key]
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(
                f"output_key={output_key!r} could not be taken from the model output of type "
                f"{type(out).__name__}: {err}"
            ) from err
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}; pass output_key= (a dict key or tuple index) "
            "to pick the embedding tensor"
        )
    if out.ndim != 2:
        raise ValueError(f"the embedding must have shape [B, D], got {tuple(out.shape)}")
    return out


def call_model(model: nn.Module, x: Batch) -> Any:
    """``model(x)`` for a tensor, ``model(**x)`` for a dict of tensors."""
    if isinstance(x, Mapping):
        return model(**x)
    return model(x)


def functional_forward(
    model: nn.Module, params: Mapping[str, Tensor], x: Batch, output_key: OutputKey
) -> Tensor:
    """The ``[B, D]`` embedding of ``x`` with ``params`` substituted into ``model``."""
    if isinstance(x, Mapping):
        out: Any = functional_call(model, dict(params), (), dict(x))
    else:
        out = functional_call(model, dict(params), (x,))
    return select_output(out, output_key)


def batch_size(x: Batch) -> int:
    """Number of items in a tensor or dict-of-tensors batch."""
    if isinstance(x, Mapping):
        if not x:
            raise ValueError("the input dict is empty")
        return next(iter(x.values())).shape[0]
    if not isinstance(x, Tensor):
        raise TypeError(f"inputs must be a tensor or a dict of tensors, got {type(x).__name__}")
    return x.shape[0]


def slice_batch(x: Batch, start: int, stop: int) -> Batch:
    """Items ``start:stop`` of a tensor or dict-of-tensors batch."""
    if isinstance(x, Mapping):
        return {key: v[start:stop] if isinstance(v, Tensor) else v for key, v in x.items()}
    return x[start:stop]


def head_of_batch(x: Batch, k: int) -> Batch:
    """The first ``k`` items of a tensor or dict-of-tensors batch."""
    return slice_batch(x, 0, k)


def prepare_inputs(x: Any, model: nn.Module) -> Batch:
    """A batch of inputs checked (:func:`check_inputs`) and moved to ``model``'s device.

    Floating tensors are cast to the dtype of the model's floating parameters when those
    share one, so float64 data from numpy meets a float32 model.
    """
    check_inputs(x)
    device, dtype = model_device(model), _float_dtype(model)

    def move(v: Tensor) -> Tensor:
        return v.to(device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device)

    if isinstance(x, Mapping):
        return {k: move(v) if isinstance(v, Tensor) else v for k, v in x.items()}
    return move(x)


def check_inputs(x: Any) -> None:
    """Refuse, with what was wrong, inputs that are not a tensor or a dict of tensors (other
    dict values may come along), that hold no item, or whose floating tensors are not finite."""
    if isinstance(x, Mapping):
        tensors = {k: v for k, v in x.items() if isinstance(v, Tensor)}
        if not tensors:
            raise TypeError("the input dict holds no tensor")
    elif isinstance(x, Tensor):
        tensors = {"inputs": x}
    else:
        hint = "torch.from_numpy(x)" if isinstance(x, np.ndarray) else "for an (x, y) batch or a loader, its inputs x"
        raise TypeError(f"inputs must be a torch.Tensor or a dict of tensors, got {type(x).__name__} ({hint})")
    if batch_size(x) == 0:
        raise ValueError("the inputs are empty (0 items)")
    for key, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            where = "the inputs" if isinstance(x, Tensor) else f"input {key!r}"
            raise ValueError(f"{where} contain {bad} NaN or infinite value(s) of {v.numel()}")


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating parameters if they share one, else None."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def split_batch(batch: Any) -> tuple[Batch, Tensor]:
    """``(x, y)`` out of a loader item (a tuple/list of two, or a dict with ``"labels"``)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    elif isinstance(batch, Mapping) and "labels" in batch:
        y = batch["labels"]
        x = {k: v for k, v in batch.items() if k != "labels"}
    else:
        raise ValueError(
            "the loader must yield (x, y) batches, or dicts with a 'labels' entry; "
            f"got {type(batch).__name__}"
        )
    if not isinstance(y, Tensor):
        if isinstance(y, (list, tuple)) and any(isinstance(v, str) for v in y):
            raise TypeError("labels must be numbers, got strings: map them to ints first")
        y = torch.as_tensor(y)
    if y.ndim == 0:
        raise ValueError(
            "labels must have shape [B], got a single label: pass batches (a DataLoader), not single items (a Dataset)"
        )
    if y.ndim != 1:
        raise ValueError(f"labels must have shape [B], got {tuple(y.shape)}")
    return x, y


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, and restore each one's own flag on exit."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
