"""Floating-point settings that matter for speed on the CPU.

With trained weights, the training step of a network meets subnormal ("denormal")
floats, below about 1.2e-38 in float32, which x86 CPUs handle in microcode, many times
slower than normal floats. On the paper's FashionMNIST CNN, one
online-LAM step with trained weights took 0.25 s with them and 0.08 s flushed to zero
(one thread). Flushing changes results only below 1.2e-38.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["denormals_flushed_now", "flush_denormals"]

_SUBNORMAL = 1e-39  # a float32 subnormal


def denormals_flushed_now() -> bool:
    """Whether the CPU currently flushes subnormal floats to zero.

    torch has a setter (``torch.set_flush_denormal``) but no getter: a subnormal that
    survives a multiplication by one says the flag is off.
    """
    probe = torch.full((8,), _SUBNORMAL, dtype=torch.float32)
    return bool((probe * 1.0)[0].item() == 0.0)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero inside the block (where the CPU supports it) and
    restore the previous setting afterwards."""
    before = denormals_flushed_now()
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(before)
