#!/usr/bin/env bash
# Set up the environment (scripts/bootstrap.sh), run the static checks (ruff on the
# repository, mypy on the plug-in package), build the documentation site with
# --strict (a broken reference fails), and run the test suite.
# Extra arguments go to pytest (e.g. --runslow, -k curvature).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
VENV=${LAM_PLUGIN_VENV:-.venv}
"$VENV/bin/ruff" check --quiet .
"$VENV/bin/mypy" --no-error-summary
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --quiet --site-dir "$site"
"$VENV/bin/python" -m pytest -q "$@"
