"""Shards of one :class:`~lam_plugin.index.UncertainIndex` across the ranks of a
``torch.distributed`` job: trained together (:func:`train_across_ranks`) and gathered
(:func:`gather`) into one index by :func:`~lam_plugin.index._merging.merge`, in rank
order, which gives one process's index over the items in that order. Shards travel as
safetensors bytes (the arrays of a saved index, no pickle) in padded ``uint8`` tensors;
small records (settings, digests, sizes, errors) go through ``all_gather_object``. Every
rank checks the same records, so a mismatch fails on every rank with one message.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.numpy
import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import in_process_group
from . import _adding
from ._embedding import predictions
from ._merging import SETTINGS, configuration, describe, merge, mergeable, short, trained_state
from ._persistence import file_config, file_tensors, restore
from .faiss_backend import copy_nprobe

if TYPE_CHECKING:
    from .uncertain_index import UncertainIndex

__all__ = ["gather", "train", "train_across_ranks"]

logger = logging.getLogger(__name__)

_TOGETHER = "train every rank's index together: index.train(its part of the sample, across_ranks=True)"


def train(index: UncertainIndex, data: Any, across_ranks: bool) -> None:
    """:func:`train_across_ranks` with ``across_ranks`` in a process group, else a plain train."""
    if across_ranks and in_process_group():
        train_across_ranks(index, data)
    else:
        _adding.train(index, data)


def train_across_ranks(index: UncertainIndex, data: Any) -> None:
    """Train the empty ``index`` of every rank on the concatenation, in rank order, of the
    ranks' ``data`` (a collective): rank 0 trains, every rank gets its trained state."""
    payload, dim, n, error = b"", None, 0, None
    try:
        payload, dim, n = _training_payload(index, data)
    except (ValueError, TypeError) as err:
        error = str(err)
    records = _all_gather({"config": configuration(index), "error": error, "dim": dim, "n": n, "nbytes": len(payload)})
    errors = "; ".join(f"rank {r}: {record['error']}" for r, record in enumerate(records) if record["error"])
    if errors:
        raise ValueError(f"train(across_ranks=True) failed on {errors}")
    dims = {r: record["dim"] for r, record in enumerate(records) if record["n"]}
    if len(set(dims.values())) != 1:
        found = f"dimensions {dims} by rank" if dims else "no items on any rank"
        raise ValueError(f"train(across_ranks=True) needs items of one dimension, got {found}")
    _same_settings([record["config"] for record in records])
    parts = _gather_bytes(payload, [r["nbytes"] for r in records], dst=0)
    state, error = b"", None
    if parts is not None:
        try:
            loaded = [safetensors.numpy.load(part.cpu().numpy().tobytes()) for part in parts if part.numel()]
            means = np.concatenate([arrays["mean"] for arrays in loaded])
            _adding._train(index, means, [arrays["var"] for arrays in loaded], fresh=True)
            with index._lock.read():
                state = _shard_bytes(index)
        except (ValueError, RuntimeError) as err:
            logger.debug("training on rank 0 failed", exc_info=True)
            error = f"train(across_ranks=True) failed on rank 0: {err}"
    state = _broadcast_bytes(state, error, src=0)
    if dist.get_rank() != 0:
        _restore(index, state, "the index trained on rank 0")
    logger.info("trained %r on %d items of %d ranks", index.index_factory, sum(r["n"] for r in records), len(records))


def _training_payload(index: UncertainIndex, data: Any) -> tuple[bytes, int | None, int]:
    """This rank's training rows as safetensors bytes (``mean`` ``[n, D]``, ``var`` ``[n, D]``
    or ``[n, 0]``), their dimension (``None`` without rows) and their number ``n``."""
    if index._index is not None:
        raise ValueError(_adding._trained_already(index))
    rows = [_adding._training_rows(index, pred) for pred in predictions(index, data, "data")]
    dims = sorted({mean.shape[1] for mean, _ in rows})
    if len(dims) > 1:
        raise ValueError(f"data has items of dimensions {dims}")
    if not rows:
        return b"", None, 0
    means, variances = (np.concatenate([row[i] for row in rows]) for i in (0, 1))
    return safetensors.numpy.save({"mean": means, "var": variances}), dims[0], means.shape[0]


def gather(index: UncertainIndex, dst: int) -> bool:
    """Merge every rank's shard into ``index`` on rank ``dst``, in rank order (a collective;
    every check runs on every rank first); whether this rank is ``dst`` (``True`` outside a
    process group). ``dst`` receives the shards one at a time, so it holds at most the
    merged index, one shard's bytes and that shard restored."""
    if not in_process_group():
        return True
    rank = dist.get_rank()
    with index._lock.read():
        record = {"config": configuration(index) | {"dst": dst}, "state": trained_state(index), "n": len(index)}
        records = _all_gather(record)
        _check_shards(index, records, dst)
        _check_disjoint(_all_gather_ids(index._items.ids, [r["n"] for r in records]))
        payload = b"" if rank == dst else _shard_bytes(index)
    sizes = [r["nbytes"] for r in _all_gather({"nbytes": len(payload)})]
    error = None
    if rank == dst:
        error = _receive_and_merge(index, sizes, dst)
    else:  # a trained shard is never empty bytes
        dist.send(_padded(payload, sizes[rank]), dst=dst)
    del payload
    _broadcast_bytes(b"", error, src=dst)  # dst's outcome: raised on every rank if an error
    if rank == dst:
        logger.info("gathered the shards of %d ranks on rank %d: %d items", len(records), dst, len(index))
    return rank == dst


def _check_shards(index: UncertainIndex, records: list[dict[str, Any]], dst: int) -> None:
    """Raise on every rank, with one message naming the ranks, unless every rank calls
    with the same ``dst``, holds a trained index of the same settings, dimension and
    trained state, of a type FAISS can merge."""
    if not 0 <= dst < len(records):
        raise ValueError(f"dst must be a rank, 0 to {len(records) - 1}, got {dst}")
    untrained = [r for r, record in enumerate(records) if record["state"] is None]
    if untrained:
        raise ValueError(f"gather(): the index of rank(s) {untrained} is not trained; {_TOGETHER}")
    _same_settings([record["config"] for record in records])
    if any(record["state"] != records[0]["state"] for record in records):
        differ = describe([short(record["state"]) for record in records], [f"rank {r}" for r in range(len(records))])
        raise ValueError(f"gather(): the ranks' trained indexes differ ({differ}); {_TOGETHER}")
    mergeable(index._index, index.index_factory)  # the same factory on every rank: the same outcome


def _check_disjoint(ids: list[np.ndarray]) -> None:
    """Raise unless no id is held by two ranks (``ids[r]`` ``[n_r]``: rank ``r``'s ids)."""
    every = np.concatenate(ids)
    owner = np.repeat(np.arange(len(ids)), [len(part) for part in ids])
    values, counts = np.unique(every, return_counts=True)
    twice = values[counts > 1]
    if twice.size:
        shown = ", ".join(f"{i} (ranks {np.unique(owner[every == i]).tolist()})" for i in twice[:10].tolist())
        raise ValueError(
            f"gather(): {twice.size} id(s) are held by more than one rank: {shown}; "
            "give each rank distinct ids= in add() (e.g. the items' global positions)"
        )


def _receive_and_merge(index: UncertainIndex, sizes: list[int], dst: int) -> str | None:
    """On ``dst``: receive each other rank's shard (``sizes[r]`` bytes) in rank order and
    merge the shards, ``index``'s own at ``dst`` (as a copy), into a new index that then
    becomes ``index``'s content. Returns the error that stopped the merge, if any; then
    ``index`` is left as it was and the remaining shards are still received, so no rank
    waits for ever."""
    target: UncertainIndex | None = None
    error = None
    for r, size in enumerate(sizes):
        if r == dst:
            with index._lock.read():
                part = _shard_bytes(index)
        else:
            received = torch.empty(size, dtype=torch.uint8, device=_device())
            dist.recv(received, src=r)
            part = received.cpu().numpy().tobytes()
            del received
        if error is not None:
            continue
        try:
            shard = _shard(index, part, r)
            del part
            if target is None:
                target = shard
            else:
                merge(target, shard)
        except (ValueError, RuntimeError) as err:
            logger.debug("merging on rank %d failed", dst, exc_info=True)
            error = f"gather(): merging the shards on rank {dst} failed at rank {r}'s: {err}"
    if error is None and target is not None:
        with index._lock.write():
            copy_nprobe(index._index, target._index)  # dst's search parameter, not rank 0's
            _adding.install(index, target._index, target._trained_digest)
            index._items = target._items
        _adding.refresh(index, "took the merged shards")
    return error


def _shard(index: UncertainIndex, part: bytes, r: int) -> UncertainIndex:
    """Rank ``r``'s shard, restored from its bytes ``part`` into a new index configured as
    ``index``, with ``index``'s trained-state digest (every rank's was checked equal)."""
    config = {k: v for k, v in file_config(index).items() if k != "dim"}
    shard = type(index)(index.posterior, progress=False, **config)
    return _restore(shard, part, f"rank {r}'s shard", index._trained_digest)


def _same_settings(configs: list[dict[str, Any]]) -> None:
    """Raise unless the ranks' ``configs`` agree, naming the entries and ranks that differ."""
    differ = describe(configs, [f"rank {r}" for r in range(len(configs))])
    if differ:
        raise ValueError(
            f"the ranks hold indexes of different configurations ({differ}); every rank must build its shard "
            "with the same UncertainIndex settings and posterior, and call with the same arguments"
        )


def _shard_bytes(index: UncertainIndex) -> bytes:
    """``index``'s FAISS index and per-item arrays (those of a saved file) as safetensors
    bytes, with its configuration and fingerprint as metadata (under the read lock)."""
    metadata = {"config": json.dumps(file_config(index)), "fingerprint": index._fingerprint or ""}
    return safetensors.numpy.save(file_tensors(index), metadata=metadata)


def _restore(index: UncertainIndex, payload: bytes, where: str, digest: str | None = None) -> UncertainIndex:
    """Fill the empty, untrained ``index`` from :func:`_shard_bytes` of an index of the same
    configuration, with the checks of :meth:`UncertainIndex.load`, and the trained-state
    ``digest`` where known (see :func:`~lam_plugin.index._adding.install`); returns ``index``."""
    (size,) = struct.unpack("<Q", payload[:8])  # safetensors: header length, JSON header, data
    metadata = json.loads(payload[8 : 8 + size]).get("__metadata__", {})
    config = json.loads(metadata["config"])
    if {k: config[k] for k in SETTINGS} != {k: getattr(index, k) for k in SETTINGS}:
        raise ValueError(f"{where} has another configuration than this index: {config}")
    tensors = safetensors.numpy.load(payload)
    with index._lock.write():
        if index._index is not None:
            raise ValueError(_adding._trained_already(index))
        restore(index, Path(where), tensors, int(config["dim"]), metadata.get("fingerprint") or None, digest)
    return index


def _device() -> torch.device:
    """Where collectives take their tensors: the current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_gather(record: Any) -> list[Any]:
    """Every rank's ``record`` (small, JSON-like), in rank order."""
    records: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    return records


def _all_gather_ids(ids: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """Every rank's int64 ids (``[counts[r]]``), through tensors padded to the largest count."""
    buffer = torch.zeros(max(*counts, 1), dtype=torch.int64)
    buffer[: len(ids)] = torch.from_numpy(np.ascontiguousarray(ids))
    buffer = buffer.to(_device())
    received = [torch.empty_like(buffer) for _ in counts]
    dist.all_gather(received, buffer)
    return [t[:n].cpu().numpy() for t, n in zip(received, counts)]


def _padded(payload: bytes, size: int) -> Tensor:
    """``payload`` in a ``uint8`` tensor of ``size`` bytes on :func:`_device`."""
    buffer = torch.zeros(size, dtype=torch.uint8)
    buffer.numpy()[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    return buffer.to(_device())


def _gather_bytes(payload: bytes, sizes: list[int], dst: int) -> list[Tensor] | None:
    """Every rank's ``payload`` (``sizes[r]`` bytes) on ``dst`` as ``uint8`` tensors, in rank
    order; ``None`` elsewhere. ``dst`` receives them at once: ranks x the largest size."""
    buffer = _padded(payload, max(*sizes, 1))
    received = [torch.empty_like(buffer) for _ in sizes] if dist.get_rank() == dst else None
    dist.gather(buffer, received, dst=dst)
    return None if received is None else [t[:n] for t, n in zip(received, sizes)]


def _broadcast_bytes(payload: bytes, error: str | None, src: int) -> bytes:
    """``src``'s ``payload`` on every rank, or ``src``'s ``error`` raised on every rank."""
    box: list[Any] = [error, len(payload)]
    dist.broadcast_object_list(box, src=src)
    if box[0] is not None:
        raise ValueError(box[0])
    if not box[1]:
        return b""
    if dist.get_rank() == src:
        dist.broadcast(_padded(payload, len(payload)), src=src)
        return payload
    buffer = torch.empty(int(box[1]), dtype=torch.uint8, device=_device())
    dist.broadcast(buffer, src=src)
    return buffer.cpu().numpy().tobytes()
