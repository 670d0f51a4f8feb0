"""Loader items as the embedding ecosystems make them, turned into inputs and labels.

A fit needs labelled batches; it takes

* ``(x, y)`` tuples or lists (more entries after ``y`` are ignored);
* dicts holding their labels under ``"labels"`` or ``"label"`` (Hugging Face datasets):
  the other entries are the inputs;
* pair batches ``(anchors, positives)`` with no class labels, as sentence-transformers
  training data is: anchors and positives are stacked into one batch of ``2B`` items and
  pair ``k`` is class ``k``, so the other items of the batch are its negatives. A pair
  batch is two dicts of tensors, or two tensors of one shape with at least two
  dimensions (a second entry of shape ``[B]`` is read as labels).

Prediction, the index and calibration need only inputs: a tensor, a dict (label keys
left out), or any of the above (its inputs). A label key never reaches the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .calling import Batch
from .wrapping import batch_size

#: dict entries that hold labels, never passed to the model
LABEL_KEYS = ("labels", "label")


def is_pair_batch(batch: Any) -> bool:
    """Whether a loader item is ``(anchors, positives)`` (module docstring)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        return False
    a, b = batch
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return True
    return isinstance(a, Tensor) and isinstance(b, Tensor) and b.ndim >= 2 and a.shape == b.shape


def labelled(batch: Any) -> tuple[Batch, Tensor]:
    """``(inputs, labels [B])`` of one loader item of a fit."""
    if is_pair_batch(batch):
        return stack_pairs(batch[0], batch[1])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    elif isinstance(batch, Mapping) and any(k in batch for k in LABEL_KEYS):
        key = next(k for k in LABEL_KEYS if k in batch)
        x, y = without_labels(batch), batch[key]
    else:
        raise ValueError(
            "a fit needs labelled batches: (x, y) tuples, dicts with a 'labels' or 'label' entry, or "
            f"(anchors, positives) pairs; got {_describe(batch)}"
        )
    return x, as_labels(y)


def inputs(batch: Any) -> Batch:
    """The model inputs of one loader item, labelled or not (label keys left out)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return without_labels(batch)
    if is_pair_batch(batch):
        return stack_pairs(batch[0], batch[1])[0]
    if isinstance(batch, (tuple, list)) and batch:
        return inputs(batch[0]) if isinstance(batch[0], Mapping) else batch[0]
    raise TypeError(f"inputs must be a tensor, a dict of tensors or a batch holding them, got {_describe(batch)}")


def iter_inputs(data: Any) -> Iterator[Batch]:
    """The input batches of ``data``: a tensor, a dict, a tuple, or a list ``[x, y]`` as a
    DataLoader yields it is one batch; any other list or iterable (a DataLoader) is a
    loader whose items are batches."""
    if is_one_batch(data):
        yield inputs(data)
        return
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, np.ndarray)):
        yield data  # type: ignore[misc]  # not inputs: checking them (wrapping.check_inputs) says what to pass instead
        return
    for batch in data:
        yield inputs(batch)


def is_one_batch(data: Any) -> bool:
    """Whether ``data`` is one batch (a tensor, a dict, a tuple, a list ``[x, y]``) rather
    than a loader of batches."""
    return isinstance(data, (Tensor, Mapping, tuple)) or _is_labelled_list(data)


def _is_labelled_list(data: Any) -> bool:
    """``[x, y]`` with labels ``y [B]`` for the ``B`` items of a tensor ``x``, or a pair batch."""
    if not isinstance(data, list) or len(data) != 2:
        return False
    x, y = data
    labels = isinstance(x, Tensor) and isinstance(y, Tensor) and y.ndim == 1 and x.ndim >= 1 and len(x) == len(y)
    return labels or is_pair_batch(data)


def without_labels(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A dict batch without its label entries."""
    return {k: v for k, v in batch.items() if k not in LABEL_KEYS}


def as_labels(y: Any) -> Tensor:
    """Labels as a ``[B]`` tensor, refusing strings and single items."""
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
    return y


def stack_pairs(anchors: Batch, positives: Batch) -> tuple[Batch, Tensor]:
    """``(anchors ++ positives, labels)``: ``2B`` items, pair ``k`` labelled ``k``.

    Dict batches are stacked key by key; token tensors ``[B, T]`` of different lengths
    are right-padded with 0 to the longer one (the attention mask then masks the padding),
    a non-tensor entry equal in both halves is kept, and label entries are left out.
    """
    n = batch_size(anchors)
    if batch_size(positives) != n:
        raise ValueError(f"a pair batch needs as many positives as anchors, got {n} and {batch_size(positives)}")
    if isinstance(anchors, Mapping):
        if not isinstance(positives, Mapping) or set(anchors) != set(positives):
            raise ValueError(
                f"anchors and positives of a pair batch need the same keys, got {sorted(anchors)} and "
                f"{sorted(positives) if isinstance(positives, Mapping) else type(positives).__name__}"
            )
        x: Batch = {k: _cat_padded(anchors[k], positives[k]) for k in anchors if k not in LABEL_KEYS}
    else:
        x = torch.cat([anchors, positives])  # type: ignore[list-item]
    idx = torch.arange(n)
    return x, torch.cat([idx, idx])


def _cat_padded(a: Any, b: Any) -> Any:
    """Two entries of a pair batch as one: tensors concatenated (token axes padded); other
    values (sentence-transformers' ``"modality": "text"``) kept where both halves agree."""
    if not isinstance(a, Tensor) and not isinstance(b, Tensor) and type(a) is type(b) and a == b:
        return a
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        raise TypeError(
            f"pair batches must hold tensors (or the same non-tensor value in both halves), got {a!r} and {b!r}"
        )
    if a.ndim >= 2 and b.ndim == a.ndim and a.shape[1] != b.shape[1]:
        length = max(a.shape[1], b.shape[1])
        a, b = (torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1])) for t in (a, b))
    return torch.cat([a, b])


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return type(batch).__name__


def first_batch(loader: Iterable[Any]) -> Any:
    """The first item of a re-iterable ``loader`` (a DataLoader, a list of batches): one
    iterator is made (a DataLoader's starts its workers and draws from its generator)."""
    if isinstance(loader, Iterator):
        raise TypeError("loader must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
    try:
        return next(iter(loader))
    except StopIteration:
        raise ValueError("the loader yielded no batch") from None
    except TypeError as err:
        raise TypeError(f"loader must be an iterable of (x, y) batches, got {type(loader).__name__}") from err


def len_or(loader: Iterable[Any], default: int) -> int:
    """``len(loader)``, or ``default`` for a loader without one."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return default
