"""The ``results.md`` of a combination of ``reproduce`` runs (:func:`lam_study.combine.write_combined`):
the runs and seeds it draws on, the table, the supplementary tables, the sources, the
configuration differences between the sources of one method, and the per-seed numbers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .reproduce import results_table, seed_counts
from .reproduce.markdown import _supplementary_markdown
from .reproduce.report import _per_seed_table

#: Display names of the datasets.
_NAMES = {"fashionmnist": "FashionMNIST", "mnist": "MNIST"}


def _markdown(combined: Mapping[str, Any], command: str | None) -> str:
    """The text of ``results.md`` for the combined results ``combined``, made by ``command``."""
    sizes = combined["data"].get("sizes", {})
    parts = [
        f"# {_NAMES.get(combined['dataset'], combined['dataset'])} → "
        f"{_NAMES.get(combined.get('ood_dataset'), combined.get('ood_dataset'))}: combined runs of the LAM paper's "
        "protocol",
        "",
        "The per-seed results of several `lam-study reproduce` runs, combined without re-evaluation "
        "(`lam_study.combine`). Each method's mean ± std is over its own seeds:",
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
    used = [source for source in combined["sources"] if source["seeds_by_method"]]
    for source in used:
        took = "; ".join(f"{m} {', '.join(map(str, s))}" for m, s in source["seeds_by_method"].items())
        wall = source.get("wall_time_s")
        parts.append(
            f"- `{source['file']}`: {took}. Command: `{source.get('command')}`"
            + (f", {wall:,.0f} s" if isinstance(wall, (int, float)) else "")
            + (f" on {source['machine']}" if source.get("machine") else "")
            + "."
        )
    unused = len(combined["sources"]) - len(used)
    if unused:
        parts.append(
            f"- {unused} more source(s) gave nothing: their seeds came from an earlier file, or `only` "
            "(`--only`) left their methods out (`sources` in results.json lists them)."
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
    """The paper's numbers that ``combined`` carries, as :func:`results_table` takes them (None without)."""
    paper = combined.get("paper")
    if not paper:
        return None
    return {
        m: {k: (None if v is None else (v.get("mean"), v.get("std"))) for k, v in row.items()}
        for m, row in paper.items()
    }
