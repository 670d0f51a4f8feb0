#!/usr/bin/env bash
# Set up the environment (scripts/bootstrap.sh) and run the test suite.
# Extra arguments go to pytest (e.g. --runslow, -k curvature).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${LAM_PLUGIN_VENV:-.venv}/bin/python" -m pytest -q "$@"
