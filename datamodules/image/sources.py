"""Where the images of a data path are and how to read them: the layouts of ``find_sources`` (image
folders, tar archives, MNIST idx files, CIFAR-10 python batches, downsampled-ImageNet ``.npz``) and a
reader for each format."""

import gzip
import io
import math
import pickle
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from datamodules.base import check_exists, check_tar_end, listed_files

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IDX_IMAGES = re.compile(r".*idx3-ubyte(\.gz)?$")


# -- sources: where the images are and how to read them --------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """A set of images: ``files`` under ``root`` (a folder, or the file itself) read as ``kind``.
    ``name`` names its cache folder."""

    kind: Literal["files", "tar", "idx", "cifar", "npz"]
    root: Path
    files: tuple[Path, ...]
    name: str


def visible_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` outside hidden files and folders, sorted by path (broken links skipped,
    with a warning)."""
    return listed_files(folder, visible=True)


def image_folder(folder: Path, name: str, files: list[Path] | None = None) -> ImageSource:
    """Every visible file under ``folder`` (``files``, if listed already), read as an image."""
    files = visible_files(folder) if files is None else files
    if not files:
        raise ValueError(f"data folder {str(folder)!r} contains no files")
    return ImageSource("files", folder, tuple(files), name)


def idx_files(files: list[Path]) -> list[Path]:
    """The MNIST ``*idx3-ubyte`` files among ``files`` (sorted); of a plain and a ``.gz`` copy, the plain one."""
    found: dict[Path, Path] = {}
    for f in files:  # sorted: "x" before "x.gz"
        if IDX_IMAGES.match(f.name):
            found.setdefault(f.with_suffix("") if f.suffix == ".gz" else f, f)
    return sorted(found.values())


def train_and_test(
    kind: str, root: Path, train: list[Path], test: list[Path]
) -> tuple[ImageSource, ImageSource | None]:
    """Two sources when ``root`` holds files of both sets, else one of all its files."""
    if train and test:
        return (
            ImageSource(kind, root, tuple(train), f"{root.name}-train"),
            ImageSource(kind, root, tuple(test), f"{root.name}-test"),
        )
    return ImageSource(kind, root, tuple(train + test), root.name), None


def find_sources(path: Path, option: str = "data path") -> tuple[ImageSource, ImageSource | None]:
    """The images at ``path``, and their own test set where the layout names one.

    A folder with train and test sets: an MNIST folder with ``train-*`` and ``t10k-*`` idx files, a
    CIFAR-10 folder (``data_batch_*`` and ``test_batch``), an npz folder with ``train*`` and
    ``val*``/``test*`` batches, or an image folder with ``train/`` and ``test/`` subfolders.
    """
    check_exists(path, option)
    name = path.name.lower()
    if path.is_file():
        if IDX_IMAGES.match(name):
            kind = "idx"
        elif name.endswith(".npz"):
            kind = "npz"
        elif name.endswith(TAR_SUFFIXES):
            kind = "tar"
        else:
            raise ValueError(
                f"data file {str(path)!r} is not an image source: give a folder of images, a .tar, .tar.gz or "
                f".tgz archive of images, an MNIST *-images-idx3-ubyte[.gz] file or an ImageNet .npz batch"
            )
        return ImageSource(kind, path, (path,), path.name), None
    cifar = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    batches, test_batch = sorted(cifar.glob("data_batch_*")), cifar / "test_batch"
    if batches or test_batch.is_file():
        return train_and_test("cifar", cifar, batches, [test_batch] if test_batch.is_file() else [])
    files = visible_files(path)
    if idx := idx_files(files):
        test = [f for f in idx if f.name.startswith(("t10k", "test"))]
        return train_and_test("idx", path, [f for f in idx if f not in test], test)
    if npz := sorted(path.glob("*.npz")):
        test = [f for f in npz if f.name.startswith(("val", "test"))]
        return train_and_test("npz", path, [f for f in npz if f not in test], test)
    if (path / "train").is_dir() and (path / "test").is_dir():
        return image_folder(path / "train", f"{path.name}-train"), image_folder(path / "test", f"{path.name}-test")
    return image_folder(path, path.name, files), None


# -- format readers ------------------------------------------------------------------------------


def open_image(data: bytes) -> Image.Image:
    """Decode an image file's bytes fully (truncated files raise), turned upright by its EXIF tag."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image)


def read_image_file(file: Path) -> Image.Image:
    return open_image(file.read_bytes())


def read_idx(file: Path) -> np.ndarray:
    """An MNIST idx3 file (plain or .gz) -> uint8 pixels (N, H, W, 1)."""
    data = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    if len(data) < 16:
        raise ValueError(f"{len(data)} bytes are too short for an idx header")
    magic, n, height, width = struct.unpack(">4I", data[:16])
    if magic != 2051:
        raise ValueError(f"magic number {magic} is not that of idx3 uint8 images (2051)")
    if len(data) != 16 + n * height * width:
        raise ValueError(f"holds {len(data) - 16} pixel bytes, its header says {n} x {height} x {width}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, height, width, 1)


def read_cifar(file: Path) -> np.ndarray:
    """A CIFAR-10 python batch (a pickled dict whose ``data`` is uint8 (N, 3072), channel-planar)
    -> uint8 pixels (N, 32, 32, 3). Unpickling runs code: only read batches you trust."""
    with open(file, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)


def read_npz(file: Path) -> np.ndarray:
    """A downsampled-ImageNet batch (``data``: uint8 (N, 3 * s * s), channel-planar) -> uint8 (N, s, s, 3)."""
    with np.load(file) as npz:
        data = npz["data"]
    s = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0  # side
    if data.dtype != np.uint8 or s == 0 or data.shape[1] != 3 * s * s:
        raise ValueError(f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3 * s * s)")
    return data.reshape(-1, 3, s, s).transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)


def tar_items(archive: Path) -> Iterator[tuple[str, Callable[[], Image.Image]]]:
    """(member name, decoder) per file in ``archive``, in archive order, hidden files left out."""
    try:
        with tarfile.open(archive, "r|*") as tar:  # a stream: gzip is read once, front to back
            for member in tar:
                if member.isfile() and not any(p.startswith(".") for p in Path(member.name).parts):
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise EOFError(f"cut short in {member.name}, {len(data)} of its {member.size} bytes")
                    yield f"{archive}:{member.name}", partial(open_image, data)
            offset = tar.offset
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise ValueError(f"cannot read the archive {str(archive)!r} ({error}): replace it with a whole one") from None
    check_tar_end(archive, offset)


def source_items(source: ImageSource) -> Iterator[tuple[str, Callable[[], Image.Image | np.ndarray]]]:
    """(name, load) per image file or array file of ``source``; ``load()`` returns a Pillow image or
    uint8 pixels (N, h, w, c), and raises if the file is corrupt."""
    if source.kind == "tar":
        yield from tar_items(source.files[0])
        return
    read = {"files": read_image_file, "idx": read_idx, "cifar": read_cifar, "npz": read_npz}[source.kind]
    for file in source.files:
        yield str(file), partial(read, file)
