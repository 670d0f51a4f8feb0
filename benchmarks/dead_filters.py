"""How many convolution filters of the cached FashionMNIST networks are dead?

A diagnostic, not a benchmark. For every network in the cache of ``lam-study reproduce
fashionmnist`` whose file name matches ``--pattern`` (networks only, not posteriors), it
prints how many filters of each convolution have every weight below ``--tol`` in
magnitude: filters that no image switches on, whose weights the weight decay has shrunk
to nothing. Only the state dicts are read; nothing is trained or evaluated.

    python benchmarks/dead_filters.py --pattern "lam_online-seed*-05dbf0cb6b.safetensors"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/fashionmnist/cache"))
    parser.add_argument("--pattern", default="*-seed*.safetensors", help="glob of network files in the cache")
    parser.add_argument("--tol", type=float, default=1e-20, help="a filter is dead when every |weight| is below this")
    args = parser.parse_args(argv)
    files = sorted(f for f in args.cache.glob(args.pattern) if not {".posterior", ".refit"} & set(f.suffixes))
    if not files:
        raise SystemExit(f"no network matches {args.pattern!r} in {args.cache}")
    for f in files:
        state = load_file(str(f))
        convs = [(name, w) for name, w in state.items() if name.endswith("weight") and w.dim() == 4]
        counts = ", ".join(
            f"{name}: {int((w.flatten(1).abs().amax(1) < args.tol).sum())}/{w.shape[0]} dead" for name, w in convs
        )
        print(f"{f.name}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
