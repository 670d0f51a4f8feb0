"""Stanford Cars / Cars196 (Krause et al., 2013): 16,185 photographs of 196 car models.

The out-of-distribution set for CUB-200-2011. Files, in the layout used by metric
learning (all images in one folder):

* ``cars_annos.mat``: MATLAB v5 file whose ``annotations`` is a struct array with,
  per image, ``relative_im_path`` (e.g. ``"car_ims/000001.jpg"``), ``class``
  (``1..196``), ``test`` (the official, class-overlapping split, not used here) and
  bounding-box fields (not used);
* ``car_ims/*.jpg``.

Split: the class-disjoint convention of metric learning, classes 1-98 (8,054 images)
for ``"train"`` and 99-196 (8,131 images) for ``"test"``. Labels are ``class - 1``.

Searched for in ``root``, ``$LAM_PLUGIN_DATA/cars196``, ``~/.cache/lam_plugin/cars196``.
Reading needs scipy and Pillow.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .base import DatasetFormatError, ImageDataset, PathLike, check_split, find_dir
from .images import load_class_split

logger = logging.getLogger(__name__)

FILES = ("cars_annos.mat", "car_ims")

#: Classes ``1..NUM_TRAIN_CLASSES`` form the train split, the rest the test split.
NUM_TRAIN_CLASSES = 98

#: Original location (offline since 2023; mirrors of the same two files exist).
URL = "http://ai.stanford.edu/~jkrause/car196/"


def load_cars196(root: PathLike | None = None, split: str = "train", *, image_size: int = 224) -> ImageDataset:
    """Cars196 ``split`` with the class-disjoint train (classes 1-98) / test (99-196) split.

    Returns:
        :class:`ImageDataset` with images ``uint8 [N, 3, image_size, image_size]`` (RGB,
        shorter side resized then centre-cropped) and labels ``int64 [N]`` = class - 1.

    Raises:
        DatasetNotFoundError: the files are in none of the searched folders.
        DatasetFormatError: the annotations are malformed or an image cannot be read.
    """
    check_split(split, ("train", "test"))
    directory = find_dir(
        "cars196",
        root,
        FILES,
        title=f"Cars196 ({split} split)",
        source="annotations and image folder",
        how_to_get=[
            f"download cars_annos.mat and car_ims.tgz (from {URL} or a mirror), "
            "unpack car_ims.tgz next to cars_annos.mat in one of the folders above",
            "pip install scipy pillow  (to read them)",
        ],
    )
    logger.info("Loading Cars196 %s split from %s", split, directory)
    paths, classes = read_annotations(directory)
    return load_class_split(paths, classes, split, NUM_TRAIN_CLASSES, image_size, name=f"cars196-{split}")


def read_annotations(directory: Path) -> tuple[list[Path], list[int]]:
    """Image paths and their 1-based classes from ``directory/cars_annos.mat``, in file order.

    Raises:
        DatasetFormatError: not a MATLAB v5 file with an ``annotations`` struct array
            holding ``relative_im_path`` and ``class``.
    """
    from scipy.io import loadmat  # optional dependency, only needed here

    path = directory / "cars_annos.mat"
    try:
        annotations = loadmat(path, squeeze_me=True, variable_names=["annotations"])["annotations"]
    except (ValueError, NotImplementedError, OSError, KeyError) as error:
        raise DatasetFormatError(f"{path}: no readable 'annotations' variable ({error!r})") from error
    fields = annotations.dtype.names or ()
    if "relative_im_path" not in fields or "class" not in fields:
        raise DatasetFormatError(f"{path}: 'annotations' needs fields relative_im_path and class, has {fields}")
    annotations = annotations.reshape(-1)
    paths = [directory / str(relative) for relative in annotations["relative_im_path"]]
    classes = [int(cls) for cls in annotations["class"]]
    if any(not 1 <= cls <= 196 for cls in classes):
        raise DatasetFormatError(f"{path}: classes must be in 1..196")
    return paths, classes
