"""Merging one :class:`~lam_plugin.index.UncertainIndex` into another in one process
(:func:`merge`), and what two indexes must share for it (:func:`configuration`,
:func:`trained_state`).

Indexes built with one configuration and one trained state (FAISS quantiser and
codebooks, variance bins) hold the codes one index would give their items, since items
are encoded one by one; appending the other's FAISS vectors (IVF: ``merge_from``, its
labels offset by the rows held, so they stay row numbers; flat codes: its codes
appended) and per-item arrays (``ItemStore.extend``), after every check, gives the index
of all the items in that order.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from . import _adding
from .faiss_backend import trained_digest

if TYPE_CHECKING:
    from .uncertain_index import UncertainIndex

__all__ = ["SETTINGS", "configuration", "describe", "merge", "mergeable", "short", "trained_state"]

#: The settings merged indexes must share (with the posterior fingerprint and the dimension).
SETTINGS = ("metric", "index_factory", "variance", "variance_dtype", "n_samples", "seed")
_MERGEABLE = "Flat, PQ, SQ and IVF factories (e.g. 'IVF1024,PQ16', also behind 'PCA64,' or 'OPQ16,'; not fast scan)"
_NO_MAP = 0  # faiss.DirectMap.NoMap (the faiss stub does not list DirectMap)


def configuration(index: UncertainIndex) -> dict[str, Any]:
    """The settings shards must share, the posterior fingerprint and the dimension."""
    return {name: getattr(index, name) for name in SETTINGS} | {"fingerprint": index._fingerprint, "dim": index._dim}


def trained_state(index: UncertainIndex) -> dict[str, str] | None:
    """SHA-256 digests of the trained state (``None`` before training): ``"faiss"``, the
    :func:`~lam_plugin.index.faiss_backend.trained_digest` of the FAISS index (taken once,
    then kept), and ``"variance bins"`` of the variance quantiser (``""`` without one)."""
    if index._index is None:
        return None
    if index._trained_digest is None:
        index._trained_digest = trained_digest(index._index)
    quantizer, bins = index._items.quantizer, hashlib.sha256()
    for array in quantizer.state().values() if quantizer is not None and quantizer.trained else ():
        bins.update(np.ascontiguousarray(array).tobytes())
    return {"faiss": index._trained_digest, "variance bins": bins.hexdigest() if quantizer is not None else ""}


def merge(index: UncertainIndex, other: UncertainIndex) -> None:
    """Append the items of ``other`` to ``index``, leaving ``other`` empty (still trained);
    under both write locks, taken in a fixed order (no deadlock between opposite merges)."""
    if other is index:
        raise ValueError("cannot merge an index into itself")
    if not isinstance(other, type(index)):
        raise TypeError(f"other must be an UncertainIndex, got {type(other).__name__}")
    first, second = sorted((index, other), key=id)
    with first._lock.write(), second._lock.write():
        ivf, n = _check_merge(index, other), len(other)
        if ivf is None:
            return
        _merge_faiss(index._index, other._index, ivf)
        index._items.extend(other._items)
        other._items.delete(np.arange(n))
        other._gpu_index = None  # made again by its next add
    _adding.refresh(index, f"merged {n} items")


def _check_merge(index: UncertainIndex, other: UncertainIndex) -> bool | None:
    """Refuse a merge of ``other`` into ``index`` that cannot be done; whether the index is
    an IVF one, or ``None`` when ``other`` has no FAISS index (no items: nothing to do)."""
    names = ("this index", "other")
    mine, theirs = configuration(index), configuration(other)
    if other._index is None or index._index is None:
        mine["dim"] = theirs["dim"] = None
    differ = describe([mine, theirs], names)
    if differ:
        raise ValueError(f"cannot merge indexes of different configurations ({differ})")
    if other._index is None:
        return None
    if index._index is None:
        raise ValueError("cannot merge into an index that is not trained: train it as other was, or load it trained")
    ivf = mergeable(index._index, index.index_factory)
    differ = describe([short(trained_state(index)), short(trained_state(other))], names)
    if differ:
        raise ValueError(
            f"cannot merge indexes whose trained states differ ({differ}): build every part from one trained "
            "index (train() on the same sample, or load one saved trained empty index for each part)"
        )
    try:
        index._items.check_new(other._items.ids)
    except ValueError as err:
        raise ValueError(f"cannot merge: {err} (give each part distinct ids= when adding)") from err
    return ivf


def _parts(faiss_index: Any) -> list[Any]:
    """``faiss_index`` (downcast) and the indexes its pre-transforms (PCA, OPQ) wrap."""
    parts = [faiss.downcast_index(faiss_index)]
    while isinstance(parts[-1], faiss.IndexPreTransform):
        parts.append(faiss.downcast_index(parts[-1].index))
    return parts


def mergeable(faiss_index: Any, factory: str) -> bool:
    """Whether the index inside the pre-transforms is an IVF one (else it stores flat
    codes); other types (HNSW, fast-scan PQ, refine, ...) are refused."""
    inner = _parts(faiss_index)[-1]
    if isinstance(inner, faiss.IndexIVF):  # not fast scan's block lists: FAISS reads them wrongly after a merge
        lists = inner.invlists
        if lists is not None and isinstance(faiss.downcast_InvertedLists(lists), faiss.ArrayInvertedLists):
            return True
    elif isinstance(inner, faiss.IndexFlatCodes):
        return False
    raise ValueError(f"faiss cannot merge {factory!r} indexes ({type(inner).__name__}); merging works for {_MERGEABLE}")


def _merge_faiss(dst: Any, src: Any, ivf: bool) -> None:
    """Move the vectors of ``src`` after those of ``dst``, then ``reset`` ``src``. IVF:
    ``merge_from`` with the labels offset by ``dst.ntotal`` (direct maps off meanwhile).
    Flat codes: ``add_sa_codes`` of ``src``'s codes, as ``merge_from`` would do but for its
    check of the C++ type (a built ``IndexFlat`` is read back as an ``IndexFlatL2``)."""
    if not ivf:
        outer, inner = _parts(dst), _parts(src)[-1]
        outer[-1].add_sa_codes(faiss.vector_to_array(inner.codes).reshape(inner.ntotal, inner.code_size))
        for part in outer[:-1]:
            part.ntotal = outer[-1].ntotal
        src.reset()
        return
    lists = [faiss.extract_index_ivf(dst), faiss.extract_index_ivf(src)]
    kinds = [part.direct_map.type for part in lists]
    for part in lists:
        part.set_direct_map_type(_NO_MAP)
    try:
        dst.merge_from(src, dst.ntotal)
        src.reset()
    finally:
        for part, kind in zip(lists, kinds):
            part.set_direct_map_type(kind)


def short(state: dict[str, str] | None) -> dict[str, str]:
    """The first 12 hex digits of each digest of :func:`trained_state` (for messages)."""
    return {k: v[:12] for k, v in (state or {}).items()}


def describe(records: list[dict[str, Any]], names: list[str] | tuple[str, ...]) -> str:
    """The entries that differ between ``records``, each with every record's value by name."""
    keys = sorted({k for r in records for k in set(r) | set(records[0]) if r.get(k) != records[0].get(k)})
    return "; ".join(f"{k}: " + ", ".join(f"{n} {r.get(k)!r}" for n, r in zip(names, records)) for k in keys)[:2000]
