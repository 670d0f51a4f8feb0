"""The plug-in installs and runs without scikit-learn, SciPy, matplotlib, the optional
pytorch-metric-learning, laplace-torch (a test dependency only), and the study package
(lam_study)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Top-level modules a minimal install lacks: the study's dependencies, the optional
# dependency of the core, laplace-torch, and the study itself.
BLOCKED = ("sklearn", "scipy", "matplotlib", "pytorch_metric_learning", "laplace", "lam_study")

# Distributions that must not be required by lam-plugin without extras.
FORBIDDEN_DISTS = {"scikit-learn", "sklearn", "scipy", "matplotlib"}

_SCRIPT = r"""
import importlib.abc
import json
import sys

BLOCKED = set(json.loads(sys.argv[1]))
attempts = []


class Block(importlib.abc.MetaPathFinder):
    # Every import of a blocked package (or of a submodule) fails as if it were not installed.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Block())

import torch
from torch import nn

import lam_plugin
import lam_plugin.metrics

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), lam_plugin.L2Normalize())
labels = torch.arange(4).repeat(4)  # 16 items, 4 of each class
loader = [(torch.randn(16, 8), labels) for _ in range(3)]
posterior = lam_plugin.LaplaceEmbedder(model, progress=False).fit(loader)
marglik = lam_plugin.LaplaceEmbedder(model, approx="pos", prior_precision="marglik", progress=False).fit(loader)
assert isinstance(marglik.prior_precision, float) and marglik.prior_precision > 0, marglik.prior_precision

x = torch.randn(12, 8)
samples = posterior.sample(x, n=5)
assert samples.shape == (5, 12, 4), samples.shape

gallery, gallery_labels = torch.randn(20, 8), torch.arange(5).repeat(4)
index = lam_plugin.UncertainIndex(posterior, progress=False).add(gallery)
result = index.search(torch.randn(6, 8), k=3)
assert result.ids.shape == (6, 3), result.ids.shape

uncertainty_id = posterior.sample(gallery, n=5).std(0).sum(-1)
uncertainty_ood = posterior.sample(10 * torch.randn(10, 8), n=5).std(0).sum(-1)
auroc = lam_plugin.metrics.auroc(uncertainty_id, uncertainty_ood)
assert 0.0 <= auroc <= 1.0, auroc
with torch.no_grad():
    mean = model(gallery)
map3 = lam_plugin.metrics.map_at_k(mean, gallery_labels, 3)
assert 0.0 <= map3 <= 1.0, map3

loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
print("RESULT " + json.dumps({"loaded": loaded, "attempts": sorted(set(attempts))}))
"""


def test_plugin_works_with_the_study_and_optional_dependencies_missing() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(BLOCKED)],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr
    report = json.loads(lines[-1].removeprefix("RESULT "))
    assert report["loaded"] == [], f"blocked modules were imported: {report['loaded']}"


_EXTRA = re.compile(r"\bextra\s*==")


def _required_closure(root: str) -> tuple[dict[str, str], list[str]]:
    """Every distribution ``root`` needs without extras, mapped to the one that requires it,
    and those of them (``name (required by ...)``) that are not installed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    required_by = {canonicalize_name(root): "(root)"}
    todo, missing = [canonicalize_name(root)], []
    while todo:
        name = todo.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{name} (required by {required_by[name]})")
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and (
                _EXTRA.search(str(req.marker)) or not req.marker.evaluate({"extra": ""})
            ):
                continue  # only for an extra, or not on this platform / Python
            dep = canonicalize_name(req.name)
            if dep not in required_by:
                required_by[dep] = name
                todo.append(dep)
    return required_by, missing


def test_lam_plugin_requires_no_study_dependency() -> None:
    pytest.importorskip("packaging")
    try:
        dist = importlib.metadata.distribution("lam-plugin")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lam-plugin is not installed")
    required_by, missing = _required_closure("lam-plugin")
    # A forbidden requirement already found fails whatever the missing ones would add.
    found = {name: required_by[name] for name in sorted(FORBIDDEN_DISTS) if name in required_by}
    where = getattr(dist, "_path", None) or dist.locate_file("")  # which metadata was read
    assert not found, f"lam-plugin (metadata: {where}) needs, without extras: {found} (name: required by)"
    if missing:  # checked as far as installed: say which requirements could not be followed
        warnings.warn(f"not installed, so their requirements were not followed: {', '.join(missing)}", stacklevel=1)
