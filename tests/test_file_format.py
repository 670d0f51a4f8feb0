"""Tests of lam_plugin.file_format: versioned safetensors files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from lam_plugin import file_format

KIND = dict(format_name="test/kind", version=3, what="test kind")


@pytest.mark.parametrize("framework", ["pt", "np"])
def test_round_trip_keeps_tensors_and_metadata(tmp_path, framework) -> None:
    x = torch.arange(6.0).view(2, 3) if framework == "pt" else np.arange(6.0, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "f.safetensors"
    file_format.write(path, {"x": x}, {"note": "kept"}, format_name="test/kind", version=3, framework=framework)
    tensors, meta = file_format.read(path, framework=framework, **KIND)
    assert meta == {"format": "test/kind", "format_version": "3", "note": "kept"}
    np.testing.assert_array_equal(np.asarray(tensors["x"]), np.asarray(x))
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


def test_refusals_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no test kind file at"):
        file_format.read(tmp_path / "missing.safetensors", framework="np", **KIND)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="not a test kind file: safetensors cannot read it"):
        file_format.read(garbage, framework="np", **KIND)
    x = {"x": np.zeros(2, dtype=np.float32)}
    other = tmp_path / "other.safetensors"
    file_format.write(other, x, {}, format_name="test/other", version=3, framework="np")
    with pytest.raises(ValueError, match="format 'test/other'"):
        file_format.read(other, framework="np", **KIND)
    newer = tmp_path / "newer.safetensors"
    file_format.write(newer, x, {}, format_name="test/kind", version=4, framework="np")
    with pytest.raises(ValueError, match="format version '4'.*reads version 3 only"):
        file_format.read(newer, framework="np", **KIND)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.safetensors"
    file_format.write(path, {"x": np.ones(2, dtype=np.float32)}, {}, format_name="test/kind", version=3, framework="np")
    before = path.read_bytes()

    def interrupted(src, dst):  # the temporary file is complete; the rename fails
        assert Path(src).parent == tmp_path and Path(src).name.endswith(".tmp") and Path(src).stat().st_size > 0
        raise OSError("interrupted")

    monkeypatch.setattr(file_format.os, "replace", interrupted)
    with pytest.raises(OSError, match="interrupted"):
        file_format.write(path, {"x": np.zeros(3, dtype=np.float32)}, {}, format_name="test/kind", version=3, framework="np")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_files_get_the_permissions_open_would_give(tmp_path, umask) -> None:
    # safetensors writes through an owner-only (0o600) temporary file of its own
    x = {"x": np.zeros(2, dtype=np.float32)}
    path = tmp_path / "f.safetensors"
    old = os.umask(umask)
    try:
        file_format.write(path, x, {}, format_name="test/kind", version=3, framework="np")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        path.chmod(0o640)  # a file being replaced keeps its permissions
        file_format.write(path, x, {}, format_name="test/kind", version=3, framework="np")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)
