"""The two distributions of the plug-in: ``lam-plugin`` (pyproject.toml, FAISS for the
CPU) and ``lam-plugin-gpu`` (packaging/lam-plugin-gpu, FAISS with GPU support). They
install the same package and differ in their FAISS requirement only, since both FAISS
wheels install the module ``faiss`` and one environment can hold only one of them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
CPU, GPU = ROOT / "pyproject.toml", ROOT / "packaging" / "lam-plugin-gpu" / "pyproject.toml"


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_the_gpu_distribution_differs_in_its_faiss_only() -> None:
    cpu, gpu = _project(CPU), _project(GPU)
    assert gpu["name"] == "lam-plugin-gpu"
    for key in ("version", "requires-python", "license"):
        assert gpu[key] == cpu[key], key
    swapped = [req.replace("faiss-cpu", "faiss-gpu") for req in cpu["dependencies"]]
    assert gpu["dependencies"] == swapped
    assert not any("faiss-cpu" in req for reqs in gpu["optional-dependencies"].values() for req in reqs)
    users = {name: reqs for name, reqs in cpu["optional-dependencies"].items() if name not in ("dev", "text")}
    assert gpu["optional-dependencies"] == users  # the extras a user of the plug-in installs


def _wheel(source: Path, out: Path) -> zipfile.ZipFile:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return zipfile.ZipFile(next(out.glob("*.whl")))


def test_both_wheels_hold_the_same_package(tmp_path) -> None:
    pytest.importorskip("hatchling")  # the GPU distribution's build backend (the dev extra)
    src = tmp_path / "src"  # a copy: setuptools would leave build/ in the repository, and reuse it
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for part in ("lam_plugin", "packaging"):
        shutil.copytree(ROOT / part, src / part, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    cpu, gpu = _wheel(src, tmp_path / "cpu"), _wheel(src / "packaging" / "lam-plugin-gpu", tmp_path / "gpu")

    def files(wheel: zipfile.ZipFile) -> dict[str, bytes]:
        return {n: wheel.read(n) for n in wheel.namelist() if n.startswith("lam_plugin/") and "__pycache__" not in n}

    assert files(gpu) == files(cpu) and "lam_plugin/py.typed" in files(cpu)
    metadata = next(n for n in gpu.namelist() if n.endswith(".dist-info/METADATA"))
    requires = [line for line in gpu.read(metadata).decode().splitlines() if line.startswith("Requires-Dist: faiss")]
    assert requires == ["Requires-Dist: faiss-gpu>=1.8"]
