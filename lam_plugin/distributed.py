"""Fitting inside a ``torch.distributed`` process group.

Each rank runs the fit over its own shard of the batches (a ``DistributedSampler``, say).
The curvature of a fit is a sum over pairs within batches, so the sum over the union of
the shards is the sum of the ranks' sums: :func:`sum_over_ranks` all-reduces the signed
float64 curvature sums and the pair counts, before the ``relu`` and the prior, and every
rank then builds the same posterior as one process over all the batches. Before that,
:func:`check_same_everywhere` compares what each rank is fitting (the subset, the
approximation, the model's parameter shapes, ...) and fails on every rank with one
message where they differ, rather than hanging in a collective of mismatched sizes.

Online LAM trains one model over the ranks: it starts them from rank 0's weights
(:func:`broadcast_module`), averages each step's gradients (:func:`average_gradients`)
and curvature (:func:`mean_over_ranks`), and gives every rank rank 0's buffers after each
optimiser step (:func:`broadcast_buffers`).

Files are written by rank 0 only (:func:`is_writer`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "average_gradients",
    "broadcast_buffers",
    "broadcast_module",
    "check_same_everywhere",
    "fail_together",
    "in_process_group",
    "is_writer",
    "mean_over_ranks",
    "sum_over_ranks",
    "unwrap",
]

logger = logging.getLogger(__name__)


def in_process_group() -> bool:
    """Whether a ``torch.distributed`` process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_writer() -> bool:
    """Whether this process writes files: always outside a process group, else rank 0 only."""
    return not in_process_group() or dist.get_rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``'s
    ``OptimizedModule`` (nested ones too), else ``model``: the posterior covers the user's
    module, whose parameter names carry no ``module.`` or ``_orig_mod.`` prefix, so a file
    saved through one wrapper loads for the plain module."""
    # torch.compile has imported it wherever a model is compiled; importing it costs 1.5 s
    compiled = sys.modules.get("torch._dynamo.eval_frame")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif compiled is not None and isinstance(model, compiled.OptimizedModule):
            inner = model._orig_mod
        else:
            return model
        logger.info("taking the module inside %s", type(model).__name__)
        model = inner


def check_same_everywhere(record: dict[str, Any]) -> None:
    """Raise on every rank, naming the entries and ranks, unless ``record`` (what this rank
    fits: JSON-like values) is the same on all ranks."""
    records: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    differ = sorted({k for r in records for k in set(r) | set(records[0]) if r.get(k) != records[0].get(k)})
    if differ:
        shown = "; ".join(f"{k}: " + ", ".join(f"rank {i} {r.get(k)!r}" for i, r in enumerate(records)) for k in differ)
        raise ValueError(
            f"the ranks of the process group fit different configurations ({shown[:2000]}); every rank must "
            "wrap the same model architecture with the same LaplaceEmbedder settings"
        )


def fail_together(error: BaseException | None, work: str = "the fit") -> None:
    """Raise on every rank, naming the ranks and their errors, if this rank's own ``work``
    failed with ``error`` or another rank's did: a rank that failed alone would leave the
    others waiting for ever in the next collective. This rank's error is chained.

    One all-reduce of a flag when no rank failed (online LAM calls this every step); the
    messages are gathered only when one did."""
    nccl = dist.get_backend() == "nccl"  # it reduces CUDA tensors only, as all_gather_object assumes too
    flag = torch.tensor([float(error is not None)], device=torch.cuda.current_device() if nccl else "cpu")
    dist.all_reduce(flag)
    if float(flag) == 0:
        return
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    failed = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
    if failed:
        raise ValueError(f"{work} failed on {failed[:2000]}") from error


def sum_over_ranks(total: Tensor, counts: list[int]) -> tuple[Tensor, list[int]]:
    """The sums of ``total`` (the signed float64 curvature ``[P]``) and of the ``counts``
    over all ranks. Under gloo, which reduces CPU tensors only, a CUDA sum goes through
    the CPU."""
    device = total.device
    on_cpu = dist.get_backend() == "gloo" and device.type != "cpu"
    summed = total.cpu() if on_cpu else total
    numbers = torch.tensor(counts, dtype=torch.float64, device=summed.device)
    dist.all_reduce(summed)
    dist.all_reduce(numbers)
    return summed.to(device), [round(v) for v in numbers.tolist()]


def broadcast_module(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (online LAM trains one model)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def average_gradients(model: nn.Module) -> None:
    """Replace each parameter's gradient by its mean over the ranks, as
    ``DistributedDataParallel`` does for its own forward passes: where some rank has a
    gradient, a rank without one counts it as zero; where no rank has one, it stays
    ``None``, so the optimiser leaves the parameter alone (no weight decay either) as one
    process does. One all-reduce of ``[n_params]`` flags decides which is which."""
    world = dist.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_collective_device(params[0]))
    dist.all_reduce(flags)
    for p, ranks_with_grad in zip(params, flags.tolist()):
        if ranks_with_grad == 0:
            p.grad = None
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics, which each rank's
    training forward passes update on its own), as ``DistributedDataParallel`` does with
    ``broadcast_buffers=True``: one broadcast of all buffers' bytes, none without buffers."""
    buffers = list(model.buffers())
    if not buffers:
        return
    device = _collective_device(buffers[0])
    flat = [b.detach().reshape(-1).to(device).view(torch.uint8) for b in buffers]  # any dtype, bit for bit
    packed = torch.cat(flat)
    dist.broadcast(packed, src=0)
    with torch.no_grad():
        for b, part in zip(buffers, packed.split([f.numel() for f in flat])):
            b.copy_(part.clone().view(b.dtype).view(b.shape))  # a clone: aligned for b's dtype


def _collective_device(like: Tensor) -> torch.device:
    """Where a collective over tensors like ``like`` runs: the CPU under gloo, which
    reduces CPU tensors only (:func:`sum_over_ranks`), else ``like``'s device."""
    return torch.device("cpu") if dist.get_backend() == "gloo" else like.device


def mean_over_ranks(h: Tensor | None, like: Tensor) -> Tensor | None:
    """The mean of ``h`` over the ranks that have one (``None``: this rank's batch had no
    pair), or None where no rank has one; every rank takes part in the same collective."""
    payload = torch.cat([h if h is not None else torch.zeros_like(like), like.new_ones(1) * (h is not None)])
    dist.all_reduce(payload)
    count = float(payload[-1])
    return payload[:-1] / count if count > 0 else None
