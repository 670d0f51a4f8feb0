"""In-memory image dataset container, errors, and where datasets are searched for.

Every loader in :mod:`lam_study.data` returns an :class:`ImageDataset` whose
images are ``uint8`` tensors of shape ``[N, C, H, W]`` and labels ``int64``
tensors of shape ``[N]``.

Search locations (each loader documents its own additions):

1. the ``root`` argument, when given;
2. ``$LAM_PLUGIN_DATA/<dataset>``;
3. ``~/.cache/lam_plugin/<dataset>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

#: Environment variable naming a folder that holds one sub-folder per dataset.
DATA_ENV_VAR = "LAM_PLUGIN_DATA"

PathLike = str | os.PathLike[str]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the searched folders.

    The message names every file that was looked for, every folder it was looked
    for in, and how to obtain the data. Build one with :meth:`from_attempts`.
    """

    @classmethod
    def from_attempts(
        cls, dataset: str, attempts: Sequence[SearchAttempt], how_to_get: Sequence[str]
    ) -> DatasetNotFoundError:
        """Summarise failed searches (one per source of the data) in one error."""
        lines = [f"{dataset} was not found. Looked for:"]
        for attempt in attempts:
            lines.extend(attempt.describe())
        lines.append("How to get it:")
        lines.extend(f"  - {step}" for step in how_to_get)
        return cls("\n".join(lines))

    @classmethod
    def from_search(
        cls, dataset: str, source: str, files: Sequence[str], dirs: Sequence[Path], how_to_get: Sequence[str]
    ) -> DatasetNotFoundError:
        """The error of a dataset with a single source: :meth:`from_attempts` with one :class:`SearchAttempt`."""
        return cls.from_attempts(dataset, [SearchAttempt(source, tuple(files), tuple(dirs))], how_to_get)


class DatasetFormatError(ValueError):
    """A dataset file exists but is corrupt, truncated, or not in the expected format."""


@dataclass(frozen=True)
class SearchAttempt:
    """One unsuccessful search: which files were looked for, in which folders.

    Attributes:
        source: what was searched for, e.g. ``"official IDX files"``.
        files: file or folder names, relative to each folder in ``dirs``.
        dirs: the folders that were searched, in order.
        note: why the source could not be searched at all, if so.
    """

    source: str
    files: tuple[str, ...]
    dirs: tuple[Path, ...]
    note: str = ""

    def describe(self) -> list[str]:
        """Human-readable lines for an error message."""
        lines = [f"  - {self.source}: {', '.join(self.files)}"]
        lines.extend(f"      in {directory}" for directory in self.dirs)
        if self.note:
            lines.append(f"      ({self.note})")
        return lines


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """Images and integer labels held in memory.

    Attributes:
        images: ``uint8`` tensor ``[N, C, H, W]`` with values in ``0..255``.
        labels: ``int64`` tensor ``[N]``.
        name: a short description, e.g. ``"fashionmnist-test"``.
    """

    images: Tensor
    labels: Tensor
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(f"labels must be an int64 tensor [N], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        shape, classes = tuple(self.images.shape), self.labels.unique().numel()
        return f"ImageDataset(name={self.name!r}, images={shape}, classes={classes})"

    def float(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Tensor:
        """``float32`` images ``[N, C, H, W]`` in ``[0, 1]``, then ``(x - mean) / std`` per channel if given.

        ``mean`` and ``std`` hold one value per channel, or a single value for all.
        """
        images = self.images.float().div_(255.0)
        if mean is not None:
            images.sub_(self._per_channel(mean, "mean"))
        if std is not None:
            images.div_(self._per_channel(std, "std"))
        return images

    def subset(self, indices: Sequence[int] | Tensor) -> ImageDataset:
        """The samples at ``indices`` (integer indices or a boolean mask ``[N]``), same name."""
        index = torch.as_tensor(indices)
        if index.dtype != torch.bool:
            index = index.long()
        return ImageDataset(self.images[index], self.labels[index], self.name)

    def loader(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> DataLoader[tuple[Tensor, ...]]:
        """A loader of ``(float32 images [B, C, H, W], int64 labels [B])`` batches, all in memory.

        The images are converted once with :meth:`float` (``mean``/``std`` as there).
        """
        dataset = TensorDataset(self.float(mean, std), self.labels)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)

    def _per_channel(self, values: Sequence[float], what: str) -> Tensor:
        tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
        channels = self.images.shape[1]
        if tensor.numel() not in (1, channels):
            raise ValueError(f"{what} needs 1 or {channels} values, got {tensor.numel()}")
        return tensor.view(1, -1, 1, 1)


def check_split(split: str, allowed: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``split`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def search_dirs(
    dataset: str, root: PathLike | None = None, nested: str | None = None, extra: Sequence[PathLike] = ()
) -> tuple[Path, ...]:
    """Folders to search for ``dataset``, in order, without duplicates.

    ``root`` (if given), ``$LAM_PLUGIN_DATA/<dataset>``, ``~/.cache/lam_plugin/<dataset>``,
    then ``extra``. With ``nested`` (the folder an official archive unpacks to, e.g.
    ``"CUB_200_2011"``), each folder ``d`` becomes ``d/nested`` followed by ``d``.
    """
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root).expanduser())
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        bases.append(Path(env).expanduser() / dataset)
    bases.append(Path.home() / ".cache" / "lam_plugin" / dataset)
    bases.extend(Path(directory) for directory in extra)
    expanded = [path for base in bases for path in ((base / nested, base) if nested else (base,))]
    return tuple(dict.fromkeys(expanded))


def first_with(dirs: Iterable[Path], names: Sequence[str]) -> Path | None:
    """The first folder of ``dirs`` that contains every one of ``names`` (files or folders)."""
    for directory in dirs:
        if all((directory / name).exists() for name in names):
            return directory
    return None


def find_dir(
    dataset: str,
    root: PathLike | None,
    files: Sequence[str],
    *,
    title: str,
    source: str,
    how_to_get: Sequence[str],
    nested: str | None = None,
) -> Path:
    """The first of :func:`search_dirs` ``(dataset, root, nested)`` that holds every one of ``files``.

    Raises:
        DatasetNotFoundError: no searched folder holds them all; the message (see
            :meth:`DatasetNotFoundError.from_search`) names ``title``, ``source``,
            ``files``, the folders searched, and ``how_to_get``.
    """
    dirs = search_dirs(dataset, root, nested=nested)
    directory = first_with(dirs, files)
    if directory is None:
        raise DatasetNotFoundError.from_search(title, source, files, dirs, how_to_get)
    return directory
