#!/usr/bin/env bash
# Set up the environment (scripts/bootstrap.sh) and run the test suite.
# Extra arguments go to pytest (e.g. --runslow, -k curvature).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
NO_MKDOCS_2_WARNING=1 "${LAM_PLUGIN_VENV:-.venv}/bin/mkdocs" build --strict --quiet --site-dir "$(mktemp -d)"
exec "${LAM_PLUGIN_VENV:-.venv}/bin/python" -m pytest -q "$@"
