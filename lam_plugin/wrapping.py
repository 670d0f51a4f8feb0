"""How the library talks to a user's model: inputs, output selection, modes.

Everything here leaves the user's model as it was: modes are restored on exit and
no hooks or attributes stay behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .calling import Batch

__all__ = ["batch_size", "check_inputs", "check_rows", "eval_mode", "head_of_batch", "model_device", "prepare_inputs", "slice_batch"]


def batch_size(x: Batch) -> int:
    """Number of items in a tensor or dict-of-tensors batch (the length of a dict's first
    tensor entry; other entries may come along)."""
    if isinstance(x, Mapping):
        size = next((v.shape[0] for v in x.values() if isinstance(v, Tensor)), None)
        if size is None:
            raise ValueError("the input dict holds no tensor" if x else "the input dict is empty")
        return int(size)
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
    dict values may come along), whose tensor entries disagree on their number of rows
    (:func:`check_rows`), that hold no item, or whose floating tensors are not finite."""
    if isinstance(x, Mapping):
        tensors = {k: v for k, v in x.items() if isinstance(v, Tensor)}
        if not tensors:
            raise TypeError("the input dict holds no tensor")
        check_rows(tensors)
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


def check_rows(tensors: Mapping[str, Tensor]) -> None:
    """Refuse a dict batch whose tensor entries do not all have the same first dimension
    ``B``: rows must be items (``input_ids``, ``attention_mask``, ``token_type_ids`` all
    ``[B, T]``), since batches are counted, sliced and stacked along that dimension.
    Flattened inputs with offsets (``nn.EmbeddingBag``, sentence-transformers'
    ``StaticEmbedding``: ``input_ids [N]``, ``offsets [B]``) cannot be cut into items."""
    rows = {key: int(v.shape[0]) if v.ndim else None for key, v in tensors.items()}
    if len(set(rows.values())) > 1 or None in rows.values():
        shown = ", ".join(f"{key!r}: {'0-dim' if n is None else n}" for key, n in rows.items())
        raise ValueError(
            f"the tensor entries of a dict batch must all hold one row per item (the same first dimension); "
            f"their first dimensions are {{{shown}}}. Flattened inputs with offsets (nn.EmbeddingBag, "
            "sentence-transformers' StaticEmbedding) cannot be cut into items: pass [B, ...] tensors, e.g. "
            "padded [B, T] input_ids, to a model that takes them"
        )


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating parameters if they share one, else None."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


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
