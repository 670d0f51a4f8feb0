#!/usr/bin/env bash
# Set up the environment (scripts/bootstrap.sh) and run the main job: the FashionMNIST
# reproduction of the paper in its quick form (under 10 minutes on 2 CPU cores).
# Extra arguments go to `lam-plugin reproduce fashionmnist` (e.g. drop the default
# --quick by passing --full, or --seeds 1 2 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
args=(--quick)
if [ "${1:-}" = "--full" ]; then args=(); shift; fi
exec "${LAM_PLUGIN_VENV:-.venv}/bin/lam-plugin" reproduce fashionmnist "${args[@]}" "$@"
