"""Decoding image files (JPEG, PNG, ...) into fixed-size RGB tensors with Pillow."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import DatasetFormatError, ImageDataset

logger = logging.getLogger(__name__)


def load_rgb(path: Path, image_size: int) -> np.ndarray:
    """One image as ``uint8 [3, image_size, image_size]``.

    The image is converted to RGB (grey-scale, palette and CMYK files included),
    resized so that its shorter side is ``image_size`` (bilinear), then centre-cropped.

    Raises:
        DatasetFormatError: the file is missing or cannot be decoded.
    """
    from PIL import Image  # optional dependency, only needed here

    try:
        with Image.open(path) as original:
            image = original.convert("RGB")
    except OSError as error:  # includes FileNotFoundError and PIL.UnidentifiedImageError
        raise DatasetFormatError(f"{path}: cannot read image ({error})") from error
    width, height = image.size
    scale = image_size / min(width, height)
    new_width, new_height = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = (new_width - image_size) // 2, (new_height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.array(image).transpose(2, 0, 1)  # a writable copy, as torch.from_numpy wants


def load_rgb_stack(paths: Sequence[Path], image_size: int) -> Tensor:
    """All ``paths`` as one ``uint8 [N, 3, image_size, image_size]`` tensor (see :func:`load_rgb`)."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    images = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    logger.info("Decoding %d images at %dx%d", len(paths), image_size, image_size)
    for i, path in enumerate(paths):
        images[i] = torch.from_numpy(load_rgb(path, image_size))
    return images


def load_class_split(
    paths: Sequence[Path], classes: Sequence[int], split: str, num_train_classes: int, image_size: int, name: str
) -> ImageDataset:
    """The class-disjoint ``split`` of the images ``paths`` with 1-based ``classes``.

    ``"train"`` keeps the images of classes ``1..num_train_classes``, ``"test"`` the
    others; labels are ``class - 1``, images as :func:`load_rgb_stack`.
    """
    keep = [i for i, cls in enumerate(classes) if (cls <= num_train_classes) == (split == "train")]
    return ImageDataset(
        images=load_rgb_stack([paths[i] for i in keep], image_size),
        labels=torch.tensor([classes[i] - 1 for i in keep], dtype=torch.int64),
        name=name,
    )
