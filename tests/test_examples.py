"""The examples run end to end (small sizes) and print what their docstrings promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lam_plugin.data import DatasetNotFoundError, load_fashionmnist, load_mnist

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _data_present() -> bool:
    try:
        load_fashionmnist(split="test")
        load_mnist(split="test")
    except DatasetNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _data_present(), reason="needs FashionMNIST and MNIST (scripts/bootstrap.sh)")


def _run(script: str, *args: str) -> str:
    # from the repository root, where the data search of the test process (./node_modules) looked too
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_quickstart() -> None:
    out = _run("quickstart.py", "--train-images", "500", "--epochs", "1")
    assert "AUROC of uncertainty for telling them apart" in out
    assert "MNIST (out of distribution)" in out


def test_retrieval_pipeline(tmp_path: Path) -> None:
    args = ["--quick", "--out", str(tmp_path / "out"), "--train-size", "500", "--gallery", "400", "--queries", "50"]
    out = _run("retrieval_pipeline.py", *args, "--samples", "4")
    assert "AUROC (query uncertainty, OoD positive)" in out
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"index.safetensors", "posterior.safetensors", "retrieval_examples.png"} <= written
