"""Combining the ``results.json`` of several ``lam-plugin reproduce`` runs into one table.

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
  difference per method in ``config_differences`` and in the markdown.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .reproduce import (
    ALL_METHODS,
    CONFIG_FIELDS_ABSENT,
    METRICS,
    SUPPLEMENTARY_METRICS,
    _aggregate,
    _json_safe,
    _per_seed_table,
    _supplementary_markdown,
    results_table,
    seed_counts,
)

__all__ = ["combine_results", "write_combined"]

#: Top-level fields that every combined run must share.
_SHARED = ("dataset", "quick", "ood_dataset")
#: Display names of the datasets.
_NAMES = {"fashionmnist": "FashionMNIST", "mnist": "MNIST"}
#: Config fields that say which part of the protocol a run covered, not how it ran.
_SCOPE = ("seeds", "methods")


def _load(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such results file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    missing = [k for k in ("dataset", "per_seed", "config", "data") if k not in results]
    if missing:
        raise ValueError(f"{path}: not a `lam-plugin reproduce` results.json (missing {', '.join(missing)})")
    return results


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12)
    return bool(a == b)


def combine_results(
    paths: Sequence[str | os.PathLike[str]], allow_config_differences: bool = False
) -> dict[str, Any]:
    """The results of ``paths`` (``results.json`` files) as one run over the union of their seeds.

    Returns a dict with the schema of ``results.json`` (``dataset``, ``seeds``, ``methods``:
    ``{name: {metric: {"mean", "std"}}}``, ``per_seed``, ``supplementary``, ``paper``)
    plus ``seeds_by_method``, ``sources`` (file, command, wall time, machine and the
    seeds each method took from it) and ``config_differences``
    (``{method: {field: {file: value}}}``). A method's mean and std are over its own
    seeds, which ``seeds_by_method`` lists.

    Args:
        paths: the ``results.json`` files, at least two.
        allow_config_differences: combine a method's seeds from runs whose configurations
            differ (beyond their seeds and methods) instead of raising.

    Raises:
        ValueError: fewer than two files, runs of different data, one (method, seed)
            with different numbers in two files, or (unless allowed) configurations
            that differ between the sources of one method.
    """
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

    per_seed: dict[str, dict[str, dict[str, Any]]] = {}
    origin: dict[str, dict[str, int]] = {}  # method -> seed -> index of the run it came from
    for i, (f, run) in enumerate(zip(files, runs)):
        for method, seeds in run["per_seed"].items():
            for seed, row in seeds.items():
                known = per_seed.setdefault(method, {}).get(seed)
                if known is None:
                    per_seed[method][seed] = row
                    origin.setdefault(method, {})[seed] = i
                    continue
                for metric in METRICS:
                    if not _same(known.get(metric), row.get(metric)):
                        raise ValueError(
                            f"{method} seed {seed} is in {files[origin[method][seed]]} and {f} with different "
                            f"results ({metric} {known.get(metric)} against {row.get(metric)}): they are two "
                            "configurations of that method; combine runs of one configuration"
                        )

    order = [m for m in ALL_METHODS if m in per_seed] + sorted(m for m in per_seed if m not in ALL_METHODS)
    per_seed = {m: dict(sorted(per_seed[m].items(), key=lambda kv: int(kv[0]))) for m in order}
    summary = {m: {k: _aggregate([row.get(k) for row in per_seed[m].values()]) for k in METRICS} for m in order}
    supplementary = {
        m: {k: _aggregate([row.get(k) for row in per_seed[m].values()]) for k in SUPPLEMENTARY_METRICS}
        for m in order
        if all(row.get(SUPPLEMENTARY_METRICS[0]) is not None for row in per_seed[m].values())
    }

    differences: dict[str, dict[str, dict[str, Any]]] = {}
    for method in order:
        used = sorted(set(origin[method].values()))
        fields = sorted({k for i in used for k in runs[i]["config"]} - set(_SCOPE))
        for key in fields:
            # a field an older run lacks stands for the behaviour it had before the field
            values = {str(files[i]): runs[i]["config"].get(key, CONFIG_FIELDS_ABSENT.get(key)) for i in used}
            if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
                differences.setdefault(method, {})[key] = values
    if differences and not allow_config_differences:
        listed = "; ".join(
            f"{method}: {key} = " + ", ".join(f"{v!r} in {f}" for f, v in values.items())
            for method, fields in differences.items()
            for key, values in fields.items()
        )
        raise ValueError(
            f"the runs differ in their configuration ({listed}); combine runs of one configuration, or allow "
            "the differences (allow_config_differences=True, `--allow-config-differences`) if they do not "
            "touch these methods"
        )

    sources = []
    for i, (f, run) in enumerate(zip(files, runs)):
        took = {m: [int(s) for s, j in origin[m].items() if j == i] for m in order}
        sources.append(
            {
                "file": str(f),
                "command": run.get("command"),
                "wall_time_s": run.get("wall_time_s"),
                "machine": (run.get("machine") or {}).get("summary"),
                "seeds_by_method": {m: sorted(s) for m, s in took.items() if s},
            }
        )
    seeds = sorted({int(s) for rows in per_seed.values() for s in rows})
    return {
        "dataset": first["dataset"],
        "seeds": seeds,
        "methods": summary,
        "supplementary": supplementary,
        "quick": first["quick"],
        "ood_dataset": first.get("ood_dataset"),
        "data": first["data"],
        "combined": True,
        "seeds_by_method": {m: [int(s) for s in per_seed[m]] for m in order},
        "per_seed": per_seed,
        "paper": first.get("paper"),
        "sources": sources,
        "config_differences": differences,
    }


def _markdown(combined: Mapping[str, Any], command: str | None) -> str:
    sizes = combined["data"].get("sizes", {})
    parts = [
        f"# {_NAMES.get(combined['dataset'], combined['dataset'])} → "
        f"{_NAMES.get(combined.get('ood_dataset'), combined.get('ood_dataset'))}: combined runs of the LAM paper's "
        "protocol",
        "",
        "The per-seed results of several `lam-plugin reproduce` runs, combined without re-evaluation "
        "(`lam_plugin.combine`). Each method's mean ± std is over its own seeds:",
        "",
        *(f"- {m}: seeds {', '.join(map(str, s))}" for m, s in combined["seeds_by_method"].items()),
        "",
    ]
    if command:
        parts += [f"Command: `{command}`", ""]
    if sizes:
        parts += ["Data: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()) + " images.", ""]
    parts += [
        results_table(combined["methods"], _paper(combined), n_seeds=seed_counts(combined)),
        "",
        *_supplementary_markdown(combined),
    ]
    parts += ["## Sources", ""]
    for source in combined["sources"]:
        took = "; ".join(f"{m} {', '.join(map(str, s))}" for m, s in source["seeds_by_method"].items()) or "nothing"
        wall = source.get("wall_time_s")
        parts.append(
            f"- `{source['file']}`: {took}. Command: `{source.get('command')}`"
            + (f", {wall:,.0f} s" if isinstance(wall, (int, float)) else "")
            + (f" on {source['machine']}" if source.get("machine") else "")
            + "."
        )
    parts.append("")
    differences = combined["config_differences"]
    parts += ["## Configuration differences between the sources of one method", ""]
    if not differences:
        parts += ["None: every method's seeds come from runs of one configuration.", ""]
    for method, fields in differences.items():
        for key, values in fields.items():
            listed = ", ".join(f"`{'not recorded' if v is None else v}` in `{f}`" for f, v in values.items())
            parts.append(f"- {method}: `{key}` is {listed}.")
    parts += ["", "## Per seed", "", _per_seed_table(combined["per_seed"]), ""]
    return "\n".join(parts)


def _paper(combined: Mapping[str, Any]) -> dict[str, dict[str, tuple[float | None, float | None] | None]] | None:
    paper = combined.get("paper")
    if not paper:
        return None
    return {
        m: {k: (None if v is None else (v.get("mean"), v.get("std"))) for k, v in row.items()}
        for m, row in paper.items()
    }


def write_combined(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    command: str | None = None,
    allow_config_differences: bool = False,
) -> tuple[dict[str, Any], list[Path]]:
    """Combine ``paths`` (:func:`combine_results`) and write ``results.json`` and ``results.md`` to ``out``.

    Returns the combined results and the two files written.
    """
    combined = combine_results(paths, allow_config_differences)
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
