#!/usr/bin/env bash
# Set up the environment (scripts/bootstrap.sh) and run the main job.
#
#   bash scripts/run.sh [ARGS...]
#       examples/text_retrieval.py: the pretrained all-MiniLM-L6-v2 as it is, its Laplace
#       posterior on WordNet definitions, retrieval with a variance per neighbour and the
#       OoD AUROC of held-out categories (a few minutes on 2 CPU cores; results in
#       runs/text). ARGS go to the example (e.g. --per-class 100, --out DIR).
#   bash scripts/run.sh --reproduce [--full] [ARGS...]
#       the FashionMNIST reproduction of the paper: `lam-study reproduce fashionmnist
#       --quick` (under 10 minutes on 2 CPU cores), or the full protocol with --full.
#       ARGS go to `lam-study reproduce fashionmnist` (e.g. --seeds 1 2 3).
#
# Everything runs offline once the bootstrap has installed the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
VENV=${LAM_PLUGIN_VENV:-.venv}
export HF_HUB_OFFLINE=1

if [ "${1:-}" = "--reproduce" ]; then
  shift
  args=()
  quick=(--quick)
  for arg in "$@"; do
    if [ "$arg" = "--full" ]; then quick=(); else args+=("$arg"); fi
  done
  exec "$VENV/bin/lam-study" reproduce fashionmnist "${quick[@]}" "${args[@]}"
fi
for arg in "$@"; do
  if [ "$arg" = "--full" ]; then
    echo "run.sh: --full belongs to the FashionMNIST reproduction: bash scripts/run.sh --reproduce --full" >&2
    exit 2
  fi
done
exec "$VENV/bin/python" examples/text_retrieval.py "$@"
