"""CUB-200-2011 (Wah et al., 2011): 11,788 photographs of 200 bird species.

Files: the official archive unpacked, i.e. the folder ``CUB_200_2011/`` with

* ``images.txt``: ``<image id> <relative path>`` per line, paths relative to ``images/``;
* ``image_class_labels.txt``: ``<image id> <class id>`` per line, class ids ``1..200``;
* ``classes.txt``: ``<class id> <class folder name>`` per line;
* ``images/<class folder>/<file>.jpg``.

Split: the class-disjoint convention of metric learning used by the paper, classes
1-100 (5,864 images) for ``"train"`` and 101-200 (5,924 images) for ``"test"``; the
official per-image ``train_test_split.txt`` is not used. Labels are ``class id - 1``,
so ``0..99`` in train and ``100..199`` in test.

Searched for in ``root``, ``$LAM_PLUGIN_DATA/cub200``, ``~/.cache/lam_plugin/cub200``
(each either holding ``CUB_200_2011/`` or being it). Decoding needs Pillow.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .base import DatasetFormatError, ImageDataset, PathLike, check_split, find_dir
from .images import load_class_split

logger = logging.getLogger(__name__)

FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "images")

#: Class ids ``1..NUM_TRAIN_CLASSES`` form the train split, the rest the test split.
NUM_TRAIN_CLASSES = 100

URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"


def load_cub200(root: PathLike | None = None, split: str = "train", *, image_size: int = 224) -> ImageDataset:
    """CUB-200-2011 ``split`` with the class-disjoint train (classes 1-100) / test (101-200) split.

    Returns:
        :class:`ImageDataset` with images ``uint8 [N, 3, image_size, image_size]`` (RGB,
        shorter side resized then centre-cropped) and labels ``int64 [N]`` = class id - 1.

    Raises:
        DatasetNotFoundError: the files are in none of the searched folders.
        DatasetFormatError: an index file is malformed or an image cannot be read.
    """
    check_split(split, ("train", "test"))
    directory = find_dir(
        "cub200",
        root,
        FILES,
        nested="CUB_200_2011",
        title=f"CUB-200-2011 ({split} split)",
        source="CUB_200_2011 folder contents",
        how_to_get=[f"download {URL} and unpack it (tar xzf) into one of the folders above"],
    )
    logger.info("Loading CUB-200-2011 %s split from %s", split, directory)
    paths, class_ids = read_index(directory)
    return load_class_split(paths, class_ids, split, NUM_TRAIN_CLASSES, image_size, name=f"cub200-{split}")


def read_index(directory: Path) -> tuple[list[Path], list[int]]:
    """Image paths and their 1-based class ids, in ``images.txt`` order.

    Raises:
        DatasetFormatError: malformed lines, an image without a class, or a class id
            missing from ``classes.txt``.
    """
    images = _read_table(directory / "images.txt")
    labels = _read_table(directory / "image_class_labels.txt")
    classes = _read_table(directory / "classes.txt")
    paths, class_ids = [], []
    for image_id, relative_path in images.items():
        if image_id not in labels or not labels[image_id].isdigit() or int(labels[image_id]) not in classes:
            raise DatasetFormatError(f"{directory}: image {image_id} has no valid class in image_class_labels.txt")
        paths.append(directory / "images" / relative_path)
        class_ids.append(int(labels[image_id]))
    return paths, class_ids


def _read_table(path: Path) -> dict[int, str]:
    """``{id: rest of line}`` from lines ``<int id> <value>``; blank lines are skipped."""
    table: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise DatasetFormatError(f"{path}:{number}: expected '<id> <value>', got {line!r}")
        table[int(key)] = value.strip()
    return table
