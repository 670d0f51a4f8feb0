"""Compare two ``results.json`` files of ``lam-study reproduce`` value by value.

Every number, string and list of the two files is compared exactly (floats bit for bit),
except what describes the run rather than its results: ``timings``, ``versions``,
``machine``, ``command``, ``wall_time_s``, ``files``, ``trained`` and
``loaded_from_cache``. Prints how many values are equal and every one that differs;
exits 1 when any differs.

Usage: ``python benchmarks/compare_results.py A/results.json B/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

SKIPPED = {"timings", "versions", "machine", "command", "wall_time_s", "files", "trained", "loaded_from_cache"}


def differences(a: Any, b: Any, path: str = "") -> tuple[int, list[tuple[str, Any, Any]]]:
    """``(number of equal leaves, [(path, a, b) of each differing one])``."""
    if isinstance(a, dict) and isinstance(b, dict):
        equal, differ = 0, []
        for key in sorted(set(a) | set(b)):
            if not path and key in SKIPPED:
                continue
            if key not in a or key not in b:
                differ.append((f"{path}/{key}", a.get(key, "<missing>"), b.get(key, "<missing>")))
                continue
            e, d = differences(a[key], b[key], f"{path}/{key}")
            equal, differ = equal + e, differ + d
        return equal, differ
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        equal, differ = 0, []
        for i, (x, y) in enumerate(zip(a, b)):
            e, d = differences(x, y, f"{path}[{i}]")
            equal, differ = equal + e, differ + d
        return equal, differ
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return (1, []) if a == b or both_nan else (0, [(path, a, b)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    with open(args.a) as fa, open(args.b) as fb:
        equal, differ = differences(json.load(fa), json.load(fb))
    print(f"{equal} values equal, {len(differ)} differ")
    for path, x, y in differ:
        print(f"  {path}: {x!r} -> {y!r}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
