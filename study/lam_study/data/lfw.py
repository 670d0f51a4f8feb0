"""Labeled Faces in the Wild (Huang et al., 2007): 13,233 face photographs of 5,749 people.

Files: the official archive unpacked, i.e. the folder ``lfw/`` with one folder per
identity, ``lfw/<Person_Name>/<Person_Name>_0001.jpg`` (250x250 JPEG).

Retrieval needs at least two images per identity, so identities with fewer than
``min_images_per_identity`` images (default 2: 1,680 identities, 9,164 images) are
dropped. Labels are the index of the identity among the kept ones sorted by name.
The train/test split is by identity (no person in both): identities are ordered by
a SHA-256 hash of ``"<seed>/<name>"`` and the first ``test_fraction`` of them form
the test split. The split thus depends only on the names and the seed, not on the
library versions.

Searched for in ``root``, ``$LAM_PLUGIN_DATA/lfw``, ``~/.cache/lam_plugin/lfw`` (each
either holding ``lfw/`` or being it). Decoding needs Pillow.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from .base import DatasetNotFoundError, ImageDataset, PathLike, check_split, search_dirs
from .images import load_rgb_stack

logger = logging.getLogger(__name__)

URL = "http://vis-www.cs.umass.edu/lfw/lfw.tgz"

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_lfw(
    root: PathLike | None = None,
    split: str = "train",
    *,
    min_images_per_identity: int = 2,
    test_fraction: float = 0.5,
    seed: int = 0,
    image_size: int = 224,
) -> ImageDataset:
    """LFW ``split`` (``"train"``, ``"test"``, or ``"all"``), split by identity.

    Returns:
        :class:`ImageDataset` with images ``uint8 [N, 3, image_size, image_size]`` (RGB,
        shorter side resized then centre-cropped) and labels ``int64 [N]``: the index of
        the identity among all kept identities sorted by name (so train and test labels
        never overlap).

    Raises:
        DatasetNotFoundError: no searched folder holds ``<name>/<image>`` files.
    """
    check_split(split, ("train", "test", "all"))
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    dirs = search_dirs("lfw", root, nested="lfw")
    directory = next((d for d in dirs if d.is_dir() and any(_image_files(d))), None)
    if directory is None:
        raise DatasetNotFoundError.from_search(
            f"LFW ({split} split)",
            "folders of face images",
            ("<Person_Name>/<Person_Name>_0001.jpg",),
            dirs,
            [f"download {URL} and unpack it (tar xzf) into one of the folders above"],
        )
    identities = read_identities(directory, min_images_per_identity)
    label_of = {name: label for label, name in enumerate(sorted(identities))}
    names = sorted(identities) if split == "all" else split_identities(sorted(identities), test_fraction, seed)[split]
    logger.info("Loading LFW %s split from %s: %d identities", split, directory, len(names))
    paths = [path for name in names for path in identities[name]]
    labels = [label_of[name] for name in names for _ in identities[name]]
    return ImageDataset(load_rgb_stack(paths, image_size), torch.tensor(labels, dtype=torch.int64), f"lfw-{split}")

def read_identities(directory: Path, min_images: int = 1) -> dict[str, list[Path]]:
    """``{identity: sorted image paths}`` for identities with at least ``min_images`` images."""
    identities: dict[str, list[Path]] = {}
    for path in _image_files(directory):
        identities.setdefault(path.parent.name, []).append(path)
    return {name: sorted(paths) for name, paths in identities.items() if len(paths) >= min_images}


def split_identities(names: list[str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """``{"train": [...], "test": [...]}``: a deterministic, seed-dependent partition of ``names``."""
    order = sorted(names, key=lambda name: hashlib.sha256(f"{seed}/{name}".encode()).hexdigest())
    num_test = round(test_fraction * len(order))
    return {"train": sorted(order[num_test:]), "test": sorted(order[:num_test])}


def _image_files(directory: Path) -> Iterator[Path]:
    """``<identity>/<image>`` files under ``directory``, lazily."""
    return (path for path in directory.glob("*/*") if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file())
