"""FashionMNIST (Xiao et al., 2017): 28x28 grey-scale images of 10 clothing classes.

Files (IDX format, ``.gz`` or uncompressed): ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte`` (60,000 images) and ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte`` (10,000 images).

Searched for in: ``root``, ``$LAM_PLUGIN_DATA/fashion-mnist``,
``~/.cache/lam_plugin/fashion-mnist``, and ``/usr/share/datasets/fashion-mnist``
(Debian/Ubuntu package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import hashlib
import logging
import urllib.request
from pathlib import Path

from .base import DatasetFormatError, DatasetNotFoundError, ImageDataset, PathLike, check_split, search_dirs
from .idx import find_idx_pair, load_idx_pair

logger = logging.getLogger(__name__)

#: Class names, in label order.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

#: ``split -> (image file stem, label file stem)``.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Where the dataset's authors publish the four ``.gz`` files.
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

#: MD5 checksums of the official ``.gz`` files (as published by the authors). The
#: Debian package recompresses them, so its files do not match these checksums.
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

#: Folders installed by operating-system packages, searched last.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

_DATASET = "fashion-mnist"


def load_fashionmnist(root: PathLike | None = None, split: str = "train", *, download: bool = False) -> ImageDataset:
    """FashionMNIST ``split`` (``"train"``: 60,000, ``"test"``: 10,000 images).

    Returns:
        :class:`ImageDataset` with images ``uint8 [N, 1, 28, 28]`` and labels ``int64 [N]``
        in ``0..9`` (see :data:`CLASSES`).

    Raises:
        DatasetNotFoundError: the files are in none of the searched folders and
            ``download`` is false.
        DatasetFormatError: a file is corrupt.
    """
    check_split(split, FILES)
    dirs = search_dirs(_DATASET, root, extra=SYSTEM_DIRS)
    found = find_idx_pair(dirs, *FILES[split])
    if found is None and download:
        found = find_idx_pair((download_fashionmnist(root),), *FILES[split])
    if found is None:
        raise _not_found(dirs, split)
    images_path, labels_path = found
    logger.info("Loading FashionMNIST %s split from %s", split, images_path.parent)
    return load_idx_pair(images_path, labels_path, name=f"fashionmnist-{split}")


def download_fashionmnist(root: PathLike | None = None, *, base_url: str | None = None) -> Path:
    """Download the four official ``.gz`` files into ``root``.

    Without ``root`` the files go to ``$LAM_PLUGIN_DATA/fashion-mnist`` if that
    variable is set, else to ``~/.cache/lam_plugin/fashion-mnist``. ``base_url``
    (default :data:`URL`) may point to a mirror; the checksums are checked all the same.

    Files already present with the right MD5 checksum are kept. Each download is
    written to ``<name>.part`` and only renamed once its checksum matches.

    Returns:
        The folder holding the files.

    Raises:
        DatasetFormatError: a downloaded file's MD5 differs from :data:`MD5`
            (the partial file is deleted).
    """
    target = Path(root).expanduser() if root is not None else search_dirs(_DATASET)[0]
    target.mkdir(parents=True, exist_ok=True)
    for filename, md5 in MD5.items():
        path = target / filename
        if path.is_file() and _md5(path) == md5:
            continue
        _download((base_url or URL) + filename, path, md5)
    return target


def _not_found(dirs: tuple[Path, ...], split: str) -> DatasetNotFoundError:
    files = tuple(f"{stem}[.gz]" for stem in FILES[split])
    return DatasetNotFoundError.from_search(
        f"FashionMNIST ({split} split)",
        "IDX files",
        files,
        dirs,
        [
            "apt-get install dataset-fashion-mnist  (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist)",
            "load_fashionmnist(..., download=True) or download_fashionmnist(root) on a machine with internet",
            f"or download {', '.join(MD5)} from {URL} into one of the folders above",
        ],
    )


def _download(url: str, path: Path, md5: str) -> None:
    partial = path.with_name(path.name + ".part")
    logger.info("Downloading %s to %s", url, path)
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != md5:
        partial.unlink()
        raise DatasetFormatError(f"{url}: MD5 {digest.hexdigest()} differs from the published {md5}; file discarded")
    partial.replace(path)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
