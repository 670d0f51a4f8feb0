"""Combining the ``results.json`` of several ``lam-study reproduce`` runs into one table.

Seeds of one protocol are often run apart: on different machines, or a method at a
time when a full run does not fit in one sitting. Every ``results.json`` keeps its
per-seed numbers (``per_seed[method][seed][metric]``), so the mean ± std over the union
of the seeds can be recomputed exactly, without re-evaluating anything.

Rules:

* every run must be of the same protocol data: ``dataset``, ``quick``, ``ood_dataset``
  and the data fingerprint (which images were fitted, validated and tested) agree, or
  :class:`ValueError` names the field and the files;
* a (method, seed) found in two runs must carry the same numbers; different numbers
  mean two configurations of one method, which is refused rather than averaged;
* configuration fields that differ between the runs a method draws on are refused by
  default. Many such differences do not touch the method (a post-hoc prior does not
  affect MC dropout), but some do (the MC-dropout layout), and this module does not
  know which; ``allow_config_differences=True`` combines anyway and lists every
  difference per method in ``config_differences`` and in the markdown;
* ``only`` takes some methods from a file and leaves its others out, for a table whose
  methods come from different runs (say, MC dropout from one combination and the other
  methods from another); a file named there must be among the inputs and hold each
  method named for it;
* a combined ``results.json`` may itself be combined again: it stands for its sources,
  each with the seeds it gave and its configuration, so new seeds join an earlier
  combination without the files it was made from. Combined files written before the
  sources kept their configuration cannot be checked; a method that draws on one of them
  and on another run is refused unless differences are allowed, and is then listed with
  the field ``config`` "not recorded".

The text of the combined ``results.md`` is :mod:`lam_study.combine_markdown`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .combine_markdown import _markdown
from .reproduce import ALL_METHODS, CONFIG_FIELDS_ABSENT, METRICS, supplementary_summary
from .reproduce.evaluation import _aggregate
from .reproduce.report import _json_safe

__all__ = ["combine_results", "write_combined"]

#: Top-level fields that every combined run must share.
_SHARED = ("dataset", "quick", "ood_dataset")
#: Config fields that say which part of the protocol a run covered, not how it ran.
_SCOPE = ("seeds", "methods")
#: Per-seed rows of every method: ``method -> seed (str) -> metric -> value``.
_PerSeed = dict[str, dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class _Source:
    """One ``reproduce`` run that a method's seeds can come from.

    ``file`` is the results file it was read from. ``config`` is ``None`` where it was not
    recorded (a source of a combined file written before sources kept their
    configuration); ``checked`` then holds the differences that file's combination found
    between its sources (``{method: {field: {label: value}}}``), which were allowed when
    it was written.
    """

    label: str
    file: str
    per_seed: dict[str, dict[str, dict[str, Any]]]
    config: dict[str, Any] | None
    command: str | None
    wall_time_s: float | None
    machine: str | None
    checked: Mapping[str, dict[str, Any]]


def _load(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such results file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    needed = ("dataset", "per_seed", "data", "sources" if results.get("combined") else "config")
    missing = [k for k in needed if k not in results]
    if missing:
        raise ValueError(f"{path}: not a `lam-study reproduce` results.json (missing {', '.join(missing)})")
    return results


def _sources(path: Path, results: Mapping[str, Any]) -> list[_Source]:
    """The runs a results file holds: the file itself, or each source of a combined file."""
    if not results.get("combined"):
        return [
            _Source(
                label=str(path),
                file=str(path),
                per_seed=results["per_seed"],
                config=results["config"],
                command=results.get("command"),
                wall_time_s=results.get("wall_time_s"),
                machine=(results.get("machine") or {}).get("summary"),
                checked={},
            )
        ]
    sources = []
    for source in results["sources"]:
        try:
            per_seed = {
                method: {str(s): results["per_seed"][method][str(s)] for s in seeds}
                for method, seeds in source["seeds_by_method"].items()
            }
        except KeyError as err:
            raise ValueError(
                f"{path}: source {source.get('file')} lists seeds that the file's per_seed lacks ({err})"
            ) from None
        sources.append(
            _Source(
                label=f"{path} ← {source.get('file')}",
                file=str(path),
                per_seed=per_seed,
                config=source.get("config"),
                command=source.get("command"),
                wall_time_s=source.get("wall_time_s"),
                machine=source.get("machine"),
                checked=results.get("config_differences", {}),
            )
        )
    return sources


def _methods_taken(
    files: Sequence[Path], runs: Sequence[Mapping[str, Any]], only: Mapping[str | os.PathLike[str], Sequence[str]]
) -> list[set[str] | None]:
    """Per file, the methods ``only`` takes from it (``None``: all), checked against the file."""
    named = {Path(p).resolve(): list(methods) for p, methods in only.items()}
    unknown = [str(p) for p in only if Path(p).resolve() not in {f.resolve() for f in files}]
    if unknown:
        raise ValueError(f"only names {', '.join(unknown)}, which is not among the results files")
    taken: list[set[str] | None] = []
    for f, run in zip(files, runs):
        wanted = named.get(f.resolve())
        if wanted is None:
            taken.append(None)
            continue
        if not wanted:
            raise ValueError(f"only: no method named for {f}")
        held = sorted(run["per_seed"])
        missing = [m for m in wanted if m not in run["per_seed"]]
        if missing:
            raise ValueError(f"only: {f} has no results of {', '.join(missing)} (it has {', '.join(held)})")
        taken.append(set(wanted))
    return taken


def _restricted(unit: _Source, methods: set[str] | None) -> _Source:
    if methods is None:
        return unit
    return replace(unit, per_seed={m: rows for m, rows in unit.per_seed.items() if m in methods})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12)
    return bool(a == b)


def combine_results(
    paths: Sequence[str | os.PathLike[str]],
    allow_config_differences: bool = False,
    only: Mapping[str | os.PathLike[str], Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The results of ``paths`` (``results.json`` files) as one run over the union of their seeds.

    Returns a dict with the schema of ``results.json`` (``dataset``, ``seeds``, ``methods``:
    ``{name: {metric: {"mean", "std"}}}``, ``per_seed``, ``supplementary``, ``paper``)
    plus ``seeds_by_method``, ``sources`` (file, command, wall time, machine, the seeds
    each method took from it and its configuration) and ``config_differences``
    (``{method: {field: {file: value}}}``). A method's mean and std are over its own
    seeds, which ``seeds_by_method`` lists. A combined file among ``paths`` contributes
    its sources, each named ``"COMBINED ← SOURCE"``.

    Args:
        paths: the ``results.json`` files, at least two; earlier combined files allowed.
        allow_config_differences: combine a method's seeds from runs whose configurations
            differ (beyond their seeds and methods) instead of raising.
        only: ``{path: methods}``: from the file ``path`` (as given in ``paths``), take
            these methods and leave out the others; files not named give every method.

    Raises:
        ValueError: fewer than two files, runs of different data, one (method, seed)
            with different numbers in two files, (unless allowed) configurations
            that differ between the sources of one method, or an ``only`` that names a
            file not in ``paths`` or a method its file does not hold.
    """
    files, runs = _load_runs(paths)
    taken = _methods_taken(files, runs, only or {})
    units = [
        _restricted(unit, taken[i]) for i, (f, run) in enumerate(zip(files, runs)) for unit in _sources(f, run)
    ]
    per_seed, origin = _merged_per_seed(units)
    order = list(per_seed)
    summary = {m: {k: _aggregate([row.get(k) for row in per_seed[m].values()]) for k in METRICS} for m in order}
    supplementary = supplementary_summary({m: list(per_seed[m].values()) for m in order})
    differences = _checked_differences(units, origin, allow_config_differences)
    first = runs[0]
    return {
        "dataset": first["dataset"],
        "seeds": sorted({int(s) for rows in per_seed.values() for s in rows}),
        "methods": summary,
        "supplementary": supplementary,
        "quick": first["quick"],
        "ood_dataset": first.get("ood_dataset"),
        "data": first["data"],
        "combined": True,
        "seeds_by_method": {m: [int(s) for s in per_seed[m]] for m in order},
        "per_seed": per_seed,
        "paper": first.get("paper"),
        "sources": _source_entries(units, origin),
        "config_differences": differences,
    }


def _load_runs(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[dict[str, Any]]]:
    """The files of ``paths`` and their results, checked to be at least two runs of the same protocol data."""
    files = [Path(p) for p in paths]
    if len(files) < 2:
        raise ValueError(f"combine needs at least two results files, got {len(files)}")
    runs = [_load(f) for f in files]
    first = runs[0]
    for f, run in zip(files[1:], runs[1:]):
        for key in _SHARED:
            if run.get(key) != first.get(key):
                raise ValueError(f"{f}: {key} {run.get(key)!r} differs from {files[0]}'s {first.get(key)!r}")
        if run["data"].get("fingerprint") != first["data"].get("fingerprint"):
            raise ValueError(
                f"{f}: its data (fingerprint {run['data'].get('fingerprint')}, sizes {run['data'].get('sizes')}) "
                f"differ from {files[0]}'s ({first['data'].get('fingerprint')}, {first['data'].get('sizes')})"
            )
    return files, runs


def _merged_per_seed(units: Sequence[_Source]) -> tuple[_PerSeed, dict[str, dict[str, int]]]:
    """The per-seed rows of every method over ``units`` and the unit each came from
    (``method -> seed -> index into units``), both with the methods in the paper's order
    (the rows with their seeds in ascending order).

    A (method, seed) found in two units must carry the same numbers (:class:`ValueError`).
    """
    per_seed: _PerSeed = {}
    origin: dict[str, dict[str, int]] = {}  # method -> seed -> index of the source it came from
    for i, unit in enumerate(units):
        for method, seeds in unit.per_seed.items():
            for seed, row in seeds.items():
                known = per_seed.setdefault(method, {}).get(seed)
                if known is None:
                    per_seed[method][seed] = row
                    origin.setdefault(method, {})[seed] = i
                    continue
                for metric in METRICS:
                    if not _same(known.get(metric), row.get(metric)):
                        raise ValueError(
                            f"{method} seed {seed} is in {units[origin[method][seed]].label} and {unit.label} with "
                            f"different results ({metric} {known.get(metric)} against {row.get(metric)}): they are "
                            "two configurations of that method; combine runs of one configuration"
                        )
    order = [m for m in ALL_METHODS if m in per_seed] + sorted(m for m in per_seed if m not in ALL_METHODS)
    rows = {m: dict(sorted(per_seed[m].items(), key=lambda kv: int(kv[0]))) for m in order}
    return rows, {m: origin[m] for m in order}


def _checked_differences(
    units: Sequence[_Source], origin: Mapping[str, Mapping[str, int]], allow: bool
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method (of ``origin``), the configuration fields that differ between the units its
    seeds come from (:func:`_config_differences`); :class:`ValueError` listing them unless ``allow``."""
    differences: dict[str, dict[str, dict[str, Any]]] = {}
    for method in origin:
        found = _config_differences(method, [units[i] for i in sorted(set(origin[method].values()))])
        if found:
            differences[method] = found
    if differences and not allow:
        listed = "; ".join(
            f"{method}: {key} = "
            + ", ".join(f"{'not recorded' if v is None else repr(v)} in {f}" for f, v in values.items())
            for method, fields in differences.items()
            for key, values in fields.items()
        )
        raise ValueError(
            f"the runs differ in their configuration ({listed}); combine runs of one configuration, or allow "
            "the differences (allow_config_differences=True, `--allow-config-differences`) if they do not "
            "touch these methods"
        )
    return differences


def _source_entries(units: Sequence[_Source], origin: Mapping[str, Mapping[str, int]]) -> list[dict[str, Any]]:
    """``sources`` of the combined results: every unit, with the seeds each method took from it."""
    sources = []
    for i, unit in enumerate(units):
        took = {m: [int(s) for s, j in origin[m].items() if j == i] for m in origin}
        sources.append(
            {
                "file": unit.label,
                "command": unit.command,
                "wall_time_s": unit.wall_time_s,
                "machine": unit.machine,
                "seeds_by_method": {m: sorted(s) for m, s in took.items() if s},
                "config": unit.config,
            }
        )
    return sources


def _config_differences(method: str, used: Sequence[_Source]) -> dict[str, dict[str, Any]]:
    """The configuration fields that differ between the sources of ``method``: ``{field: {label: value}}``.

    Sources without a recorded configuration cannot be compared field by field. Those of
    one combined file were compared when it was written, and what it found then is kept;
    if the method also draws on another file, it gets the field ``config`` with ``None``
    (not recorded) or ``"recorded"`` per source.
    """
    differences: dict[str, dict[str, Any]] = {}
    unrecorded = [u for u in used if u.config is None]
    if unrecorded and len({u.file for u in used}) > 1:
        differences["config"] = {u.label: None if u.config is None else "recorded" for u in used}
    for u in unrecorded:
        differences.update(u.checked.get(method, {}))
    recorded = [u for u in used if u.config is not None]
    for key in sorted({k for u in recorded for k in u.config or {}} - set(_SCOPE)):
        # a field an older run lacks stands for the behaviour it had before the field
        values = {u.label: (u.config or {}).get(key, CONFIG_FIELDS_ABSENT.get(key)) for u in recorded}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            differences[key] = values
    return differences


def write_combined(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    command: str | None = None,
    allow_config_differences: bool = False,
    only: Mapping[str | os.PathLike[str], Sequence[str]] | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Combine ``paths`` (:func:`combine_results`) and write ``results.json`` and ``results.md`` to ``out``.

    Returns the combined results and the two files written.
    """
    combined = combine_results(paths, allow_config_differences, only)
    if command is not None:
        combined["command"] = command
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "results.md", out_dir / "results.json"
    md.write_text(_markdown(combined, command), encoding="utf-8")
    with js.open("w", encoding="utf-8") as stream:
        json.dump(_json_safe(combined), stream, indent=2, allow_nan=False)
        stream.write("\n")
    return combined, [js, md]
