"""Is a shortfall against the paper's FashionMNIST row larger than the seeds' own spread?

A diagnostic, not a benchmark: for each method and metric of one or more ``results.json``
files (``lam-study reproduce`` or ``lam-study combine``), it compares the per-seed
values with the paper's mean ± std (:data:`lam_study.reproduce.PAPER_FASHIONMNIST`,
taken as five seeds, docs/design.md §7) and prints:

* our mean ± sample std over ``n`` seeds, and the difference to the paper's mean, signed
  so that a positive number is better than the paper (lower is better for ECE);
* Welch's t statistic and the one-sided p-value of "our mean is worse than the paper's"
  (``scipy.stats.ttest_ind_from_stats``). A small p-value says the shortfall is more than
  seed-to-seed noise; a large one says the seeds cannot tell the two means apart.

The paper prints two decimals, so its mean is known to ± 0.005 only, and a printed std of
0.00 could be anything below 0.005: it is taken as 0.005, the largest value it could be
(the choice that makes a difference least significant).

    python benchmarks/against_paper.py docs/results/fashionmnist-online-refit-pos-ten-seeds.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy.stats import ttest_ind_from_stats

from lam_study.reproduce import PAPER_FASHIONMNIST

#: the paper's seeds per method (docs/design.md §7: mean ± std over seeds 1-5)
PAPER_SEEDS = 5
#: a printed std of 0.00 is below this
PAPER_STD_FLOOR = 0.005
#: metrics where a lower value is better
LOWER_IS_BETTER = ("ece",)


def compare(values: list[float], paper_mean: float, paper_std: float, lower_is_better: bool) -> dict[str, float]:
    """Our seeds against the paper's ``mean ± std`` of :data:`PAPER_SEEDS` seeds.

    Returns ``mean``, ``std`` (sample std, ddof 1), ``n``, ``better_by`` (our mean minus the
    paper's, negated where lower is better), ``t`` (Welch, in the same direction) and ``p``
    (one-sided: the probability of a difference at least this far below zero when the
    means are equal; ``nan`` with fewer than two seeds).
    """
    arr = np.asarray(values, dtype=float)
    n = len(arr)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if n > 1 else math.nan
    sign = -1.0 if lower_is_better else 1.0
    better_by = sign * (mean - paper_mean)
    if n < 2:
        return {"mean": mean, "std": std, "n": n, "better_by": better_by, "t": math.nan, "p": math.nan}
    test = ttest_ind_from_stats(
        mean, std, n, paper_mean, max(paper_std, PAPER_STD_FLOOR), PAPER_SEEDS, equal_var=False,
        alternative="greater" if lower_is_better else "less",
    )
    return {"mean": mean, "std": std, "n": n, "better_by": better_by, "t": sign * float(test.statistic),
            "p": float(test.pvalue)}


def rows(results: dict) -> list[tuple[str, str, dict[str, float], tuple[float, float | None]]]:
    """``(method, metric, compare(...), (paper mean, paper std or None))`` for every method
    and metric of ``results`` that the paper reports (a paper value printed without a std,
    the deep ensemble's, is compared as if its std were :data:`PAPER_STD_FLOOR`)."""
    out = []
    for method, per_seed in results["per_seed"].items():
        for metric, paper in PAPER_FASHIONMNIST.get(method, {}).items():
            if paper is None:
                continue
            values = [v[metric] for v in per_seed.values() if v.get(metric) is not None]
            if not values:
                continue
            paper_mean, paper_std = paper
            stats = compare(values, paper_mean, paper_std or 0.0, metric in LOWER_IS_BETTER)
            out.append((method, metric, stats, (paper_mean, paper_std)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="results.json files")
    args = parser.parse_args(argv)
    print("| file | method | metric | ours (n) | paper | better by | Welch t | p (ours worse) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.results:
        results = json.loads(path.read_text())
        # every run writes results.json: name those by their folder
        label = f"{path.parent.name}/{path.name}" if path.name == "results.json" else path.name
        for method, metric, s, (pm, ps) in rows(results):
            print(
                f"| {label} | {method} | {metric} | {s['mean']:.3f} ± {s['std']:.3f} ({s['n']}) | "
                f"{pm:.2f}{'' if ps is None else f' ± {ps:.2f}'} | {s['better_by']:+.3f} | {s['t']:+.2f} | "
                f"{s['p']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
