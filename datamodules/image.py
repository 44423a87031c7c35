"""Images as byte sequences: one image is one sequence of H * W * C bytes, 8 bits per channel.

Every image is converted to ``channels`` (1: grey, 3: RGB) at ``image_size`` and scanned into
bytes in one of two orders:

- ``raster``: pixels row by row, channels interleaved: the (H, W, C) array read in C order.
- ``patch``: p x p pixel blocks (p = ``scan_patch``) in raster order, each block's pixels in
  raster order with channels interleaved, so one block is P = p * p * C consecutive bytes: a
  MegaByte patch when the model's ``patch_size`` is P (the paper's ImageNet 64: 2 x 2 x 3 = 12).

A sequence holds one whole image, so the test bits per byte are bits per dimension.

``path`` names the source:

- ``mnist`` or ``cifar10``: torchvision's dataset, downloaded in ``prepare_data`` into
  ``cache_dir/torchvision``; its official test set is the test split.
- MNIST idx files (``*-images-idx3-ubyte``, plain or ``.gz``): one file, or a folder of them.
- A CIFAR-10 python folder (``cifar-10-batches-py`` or the folder holding it).
- Downsampled ImageNet ``.npz`` batches (key ``data``: uint8 (N, 3 * s * s), channel-planar, so the
  first s * s values of a row are red): one file, or a folder of them.
- A ``.tar``, ``.tar.gz`` or ``.tgz`` archive of image files, read in archive order.
- A folder of image files Pillow reads (JPEG, PNG, BMP, GIF, WEBP, ...), flat or ImageFolder-style
  (``class/xxx.jpg``), read in path order; hidden files and folders (``.name``) are ignored.

Each source is decoded once in ``prepare_data`` into a uint8 file (N, seq_len) in a cache folder
named for the source's files (path, size, mtime) and the options that change the bytes; ``setup``
memory-maps it, so a dataset larger than RAM works.
"""

import gzip
import hashlib
import inspect
import io
import json
import logging
import math
import pickle
import re
import struct
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision
from torchvision.datasets.utils import check_integrity
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from datamodules.base import ByteDataModule, Bytes, as_uint8
from datamodules.text import default_cache_dir, split_bounds

log = logging.getLogger(__name__)

NAMED_SOURCES = ("mnist", "cifar10")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IDX_IMAGES = re.compile(r".*idx3-ubyte(\.gz)?$")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
CHUNK = 4096  # images converted and written at a time from an array source
CACHE_VERSION = 1  # part of the cache key: bump it when decoding changes, so old caches are not reused


# -- image <-> bytes (pure) ---------------------------------------------------------------------


def image_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``image_size``, an int (square) or [height, width] -> (height, width)."""
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ValueError(f"image_size must be a positive int or [height, width], got {image_size!r}")
    return size


def check_scan(height: int, width: int, scan: str, scan_patch: int) -> None:
    """Raise a ValueError naming the option to fix unless ``scan`` can order a height x width image."""
    if scan not in ("raster", "patch"):
        raise ValueError(f"scan must be 'raster' or 'patch', got {scan!r}")
    if not isinstance(scan_patch, int) or scan_patch < 1:
        raise ValueError(f"scan_patch must be a positive integer, got {scan_patch!r}")
    if scan == "patch" and (height % scan_patch or width % scan_patch):
        p = scan_patch
        divisor = max(d for d in range(1, p + 1) if math.gcd(height, width) % d == 0)
        raise ValueError(
            f"image_size {height}x{width} is not divisible by scan_patch {p}: use image_size "
            f"{math.ceil(height / p) * p}x{math.ceil(width / p) * p} or scan_patch {divisor}"
        )


def pixels_to_bytes(pixels: np.ndarray, scan: str, scan_patch: int) -> np.ndarray:
    """Images uint8 (N, H, W, C) -> their byte sequences uint8 (N, H * W * C) in ``scan`` order."""
    N, H, W, C = pixels.shape
    if scan == "patch":
        p = scan_patch
        pixels = pixels.reshape(N, H // p, p, W // p, p, C)  # (N, block row, y, block column, x, C)
        pixels = pixels.transpose(0, 1, 3, 2, 4, 5)  # (N, block row, block column, y, x, C)
    return np.ascontiguousarray(pixels).reshape(N, H * W * C)


def bytes_to_pixels(data: np.ndarray, height: int, width: int, channels: int, scan: str, scan_patch: int) -> np.ndarray:
    """Byte sequences uint8 (N, H * W * C) in ``scan`` order -> images uint8 (N, H, W, C)."""
    N, H, W, C = len(data), height, width, channels
    if scan == "patch":
        p = scan_patch
        blocks = data.reshape(N, H // p, W // p, p, p, C)  # (N, block row, block column, y, x, C)
        return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(N, H, W, C)
    return data.reshape(N, H, W, C)


def image_to_bytes(image: torch.Tensor, scan: Literal["raster", "patch"] = "raster", scan_patch: int = 2) -> np.ndarray:
    """An image, uint8 tensor (C, H, W) -> its byte sequence, uint8 array (H * W * C,).

    ``raster``: pixels row by row, channels interleaved. ``patch``: ``scan_patch`` x ``scan_patch``
    blocks in raster order, each block's pixels in raster order, channels interleaved.
    """
    if image.dim() != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 image (C, H, W), got {image.dtype} {tuple(image.shape)}")
    C, H, W = image.shape
    check_scan(H, W, scan, scan_patch)
    pixels = image.detach().cpu().permute(1, 2, 0).numpy()[None]  # (1, H, W, C)
    return pixels_to_bytes(pixels, scan, scan_patch)[0]


def bytes_to_image(
    data: Bytes,
    height: int,
    width: int,
    channels: int,
    scan: Literal["raster", "patch"] = "raster",
    scan_patch: int = 2,
) -> torch.Tensor:
    """Any byte sequence -> an image, uint8 tensor (channels, height, width); inverse of ``image_to_bytes``.

    A sequence shorter than height * width * channels bytes is zero-padded (black) at the end, a longer
    one is truncated, so generated sequences of any length decode. Raises only on bad arguments.
    """
    check_scan(height, width, scan, scan_patch)
    if channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels}")
    n = height * width * channels
    values = as_uint8(data)[:n]
    flat = np.zeros((1, n), dtype=np.uint8)
    flat[0, : len(values)] = values
    pixels = bytes_to_pixels(flat, height, width, channels, scan, scan_patch)[0]  # (H, W, C)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (C, H, W)


# -- any picture -> pixels of the configured size and channels -----------------------------------


def to_8bit(image: Image.Image) -> Image.Image:
    """Any Pillow image -> mode "L" (grey) or "RGB", 8 bits per channel.

    16-bit grey keeps the high byte of each value (v >> 8, as Pillow reads 16-bit RGB; Pillow's own
    ``convert("L")`` would clip at 255). Palette images become RGB; alpha is composited onto black.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)  # (H, W), 0..65535
        return Image.fromarray((values >> 8).astype(np.uint8))
    if image.mode == "F":
        raise ValueError("floating-point images (Pillow mode F) have no defined 0..255 range")
    has_alpha = image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info
    if not has_alpha:
        return image if image.mode in ("L", "RGB") else image.convert("L" if image.mode == "1" else "RGB")
    rgba = np.asarray(image.convert("RGBA")).astype(np.uint16)  # (H, W, 4)
    rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # composited onto black, rounded
    return Image.fromarray(rgb.astype(np.uint8))


def image_pixels(
    image: Image.Image, height: int, width: int, channels: int, resize: Literal["resize", "crop"]
) -> np.ndarray:
    """A Pillow image -> uint8 pixels (height, width, channels).

    An image of another size is resized to height x width (``resize``: stretched; ``crop``: scaled to
    cover it keeping the aspect ratio, then center-cropped), bicubic, antialiased.
    """
    image = to_8bit(image).convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        if resize == "crop":
            image = ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)
        else:
            image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image).reshape(height, width, channels)


def fit_pixels(
    pixels: np.ndarray, height: int, width: int, channels: int, resize: Literal["resize", "crop"]
) -> np.ndarray:
    """uint8 (N, h, w, c), c = 1 or 3 -> uint8 (N, height, width, channels); unchanged if they match."""
    if pixels.shape[1:] == (height, width, channels):
        return pixels
    images = (Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels)
    return np.stack([image_pixels(image, height, width, channels, resize) for image in images])


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
    """Every file under ``folder`` outside hidden files and folders, sorted by path."""
    return sorted(
        f for f in folder.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts)
    )


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


def find_sources(path: Path) -> tuple[ImageSource, ImageSource | None]:
    """The images at ``path``, and their own test set where the layout names one.

    A folder with train and test sets: an MNIST folder with ``train-*`` and ``t10k-*`` idx files, a
    CIFAR-10 folder (``data_batch_*`` and ``test_batch``), an npz folder with ``train*`` and
    ``val*``/``test*`` batches, or an image folder with ``train/`` and ``test/`` subfolders.
    """
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
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


def named_folder(name: str, cache_dir: Path) -> Path:
    """Where torchvision keeps the raw files of ``name`` ("mnist" or "cifar10") under ``cache_dir``."""
    root = cache_dir / "torchvision"
    return root / "MNIST" / "raw" if name == "mnist" else root / "cifar-10-batches-py"


# (file name, MD5) of every raw file torchvision downloads, from its own integrity lists
TORCHVISION_FILES = {
    "mnist": [tuple(item) for item in torchvision.datasets.MNIST.resources],
    "cifar10": [tuple(item) for item in torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list],
}


def verified_files(name: str, folder: Path) -> bool:
    """Every raw file of ``name`` is in ``folder`` with its expected MD5."""
    return all(check_integrity(str(folder / file), md5) for file, md5 in TORCHVISION_FILES[name])


def download_named(name: str, cache_dir: Path) -> None:
    """Download MNIST or CIFAR-10 with torchvision into ``cache_dir/torchvision`` unless every file is
    already there with its MD5. A file that fails its checksum (e.g. a download cut short) is removed
    first: a partial download is never taken for a complete one."""
    folder = named_folder(name, cache_dir)
    if verified_files(name, folder):
        return
    for file, md5 in TORCHVISION_FILES[name]:
        if (folder / file).exists() and not check_integrity(str(folder / file), md5):
            log.warning("%s fails its MD5 check (an interrupted download?): removed, downloading again", folder / file)
            (folder / file).unlink()
    dataset_class = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.CIFAR10
    log.info("downloading %s to %s", name, folder)
    try:
        dataset_class(str(cache_dir / "torchvision"), train=True, download=True)
    except (OSError, RuntimeError) as error:
        expected = (
            "train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz"
            if name == "mnist"
            else "the python batches data_batch_1 ... data_batch_5 and test_batch"
        )
        raise RuntimeError(
            f"{name} is not in {folder} and could not be downloaded ({error}). Put {expected} there, or pass "
            f"the path of a local copy as data.path (any folder or archive of images works too)"
        ) from error
    if not verified_files(name, folder):
        raise RuntimeError(f"the {name} files downloaded to {folder} do not match torchvision's MD5 checksums")


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
                    yield f"{archive}:{member.name}", partial(open_image, tar.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"cannot read the archive {str(archive)!r}: {error}") from error


def source_items(source: ImageSource) -> Iterator[tuple[str, Callable[[], Image.Image | np.ndarray]]]:
    """(name, load) per image file or array file of ``source``; ``load()`` returns a Pillow image or
    uint8 pixels (N, h, w, c), and raises if the file is corrupt."""
    if source.kind == "tar":
        yield from tar_items(source.files[0])
        return
    read = {"files": read_image_file, "idx": read_idx, "cifar": read_cifar, "npz": read_npz}[source.kind]
    for file in source.files:
        yield str(file), partial(read, file)


# -- datasets over the cached (N, seq_len) array ----------------------------------------------------


class ImageRows(Dataset):
    """Rows ``indices`` of ``images``, a uint8 (N, seq_len) memory map; item i is uint8 (seq_len,)."""

    def __init__(self, images: np.memmap, indices: np.ndarray) -> None:
        self.images = images
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        """-> uint8 (seq_len,), the bytes of image ``indices[index]``."""
        return torch.from_numpy(np.array(self.images[self.indices[index]]))

    # Worker processes started by spawn or forkserver reopen the map instead of receiving a copy of it.
    def __getstate__(self) -> dict[str, Any]:
        return {"file": self.images.filename, "shape": self.images.shape, "indices": self.indices}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.images = np.memmap(state["file"], dtype=np.uint8, mode="r", shape=state["shape"])
        self.indices = state["indices"]


def split_indices(n: int, split: tuple[float, float, float], order: np.ndarray) -> list[np.ndarray]:
    """The train / val / test image indices: consecutive runs of ``order`` (a permutation of range(n))
    of floor-rounded sizes, each split with a positive fraction getting at least one image (taken from
    train). Each is sorted, so evaluation reads the source in order."""
    bounds = split_bounds(n, split)
    counts = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    for i in (1, 2):
        if split[i] > 0 and counts[i] == 0 and counts[0] > 1:
            counts[0], counts[i] = counts[0] - 1, 1
    ends = np.cumsum(counts)
    return [np.sort(order[end - count : end]) for count, end in zip(counts, ends)]


class ImageDataModule(ByteDataModule):
    """Images of any source as byte sequences of H * W * C bytes, one image per sequence.

    Batches are ``(x, mask)``: ``x`` uint8 (B, seq_len) image bytes, ``mask`` bool (B, seq_len), all True.

    Splits: ``split`` gives the fractions of ``path``'s images for train / val / test, assigned at
    random (seeded by ``seed``) or, with ``shuffle_split=False``, as consecutive runs in source order.
    When the test split has its own source (``test_path``, the official test set of ``mnist`` and
    ``cifar10``, or a folder layout with a test set, see ``find_sources``) that is the test split and
    the test fraction of ``path`` goes to training; val is always a share of ``path``.
    """

    media = "image"

    def __init__(
        self,
        path: str = "mnist",
        test_path: str | None = None,
        image_size: int | tuple[int, int] = 28,
        channels: int = 1,
        scan: Literal["raster", "patch"] = "raster",
        scan_patch: int = 2,
        resize: Literal["resize", "crop"] = "resize",
        split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        shuffle_split: bool = True,
        batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 2,
        cache_dir: str | None = None,
        on_bad_file: Literal["warn", "raise"] = "warn",
    ) -> None:
        """
        Args:
            path: The images: ``mnist`` or ``cifar10`` (downloaded by torchvision), a folder of image files
                (flat or ``class/xxx.jpg``), a .tar/.tar.gz/.tgz archive of them, MNIST idx files, a CIFAR-10
                python folder, or downsampled-ImageNet .npz batches (a file or a folder).
            test_path: A separate source of test images (e.g. ``cifar10-test.tar.gz``); not allowed when
                ``path`` has its own test set.
            image_size: Height and width in pixels (an int for square images, or [height, width]); other
                sizes are resized. seq_len = height * width * channels, linked to the model's max_seq_len.
            channels: 1 (grey) or 3 (RGB); images are converted (alpha composited onto black).
            scan: Byte order of an image: ``raster`` (row-major pixels, channels interleaved) or ``patch``
                (scan_patch x scan_patch blocks in raster order, each in raster order).
            scan_patch: Block side p of the patch scan; a block is p * p * channels bytes, which should be
                the model's patch_size. image_size must be a multiple of it.
            resize: How an image of another size is fitted: ``resize`` (stretched) or ``crop`` (scaled to
                cover image_size keeping its aspect ratio, then center-cropped).
            split: Fractions of ``path``'s images for train / val / test (train and val positive, summing
                to 1). The test fraction goes to train when there is a separate test source.
            shuffle_split: Split ``path`` at random (seeded by ``seed``); False cuts it in source order,
                e.g. MNIST t10k's suggested first 9,000 / last 1,000 with split [0.9, 0.1, 0].
            batch_size: Images per batch.
            seed: Seed of the split and of the order of the training images.
            num_workers: DataLoader worker processes.
            cache_dir: Where decoded images (and downloads) are kept; default ``$MEGABYTE_CACHE`` or
                ``~/.cache/megabyte``.
            on_bad_file: A file that is not a readable image: ``warn`` (skip it, one warning listing the
                skipped files) or ``raise`` (an error naming it).
        """
        super().__init__()
        self.height, self.width = image_hw(image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        check_scan(self.height, self.width, scan, scan_patch)
        if resize not in ("resize", "crop"):
            raise ValueError(f"resize must be 'resize' or 'crop', got {resize!r}")
        if on_bad_file not in ("warn", "raise"):
            raise ValueError(f"on_bad_file must be 'warn' or 'raise', got {on_bad_file!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if len(split) != 3 or split[0] <= 0 or split[1] <= 0 or split[2] < 0 or abs(sum(split) - 1.0) > 1e-9:
            raise ValueError(
                f"split must be three fractions (train, val, test) summing to 1 with train and val positive, "
                f"e.g. [0.9, 0.05, 0.05]; got {split}"
            )
        if path in NAMED_SOURCES and test_path is not None:
            raise ValueError(f"{path} has its own test set: leave test_path unset (got {test_path!r})")
        self.save_hyperparameters()
        self.path = path
        self.test_path = test_path
        self.channels = channels
        self.scan = scan
        self.scan_patch = scan_patch
        self.resize = resize
        self.split = tuple(split)
        self.shuffle_split = shuffle_split
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.on_bad_file = on_bad_file
        self.seq_len = self.height * self.width * channels
        self.splits: dict[str, ImageRows] = {}

    @classmethod
    def seq_len_from_args(cls, init_args: dict[str, Any]) -> int:
        """height * width * channels of ``init_args``, missing keys taking ``__init__``'s defaults."""
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        args = {**defaults, **init_args}
        height, width = image_hw(args["image_size"])
        return height * width * int(args["channels"])

    # -- sources -> cached uint8 (N, seq_len) files --------------------------------------------------

    def sources(self) -> tuple[ImageSource, ImageSource | None]:
        """The training source (``path``) and the test source, if there is one."""
        if self.path in NAMED_SOURCES:
            folder = named_folder(self.path, self.cache_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"{self.path} is not downloaded (expected in {folder}); prepare_data gets it")
            return find_sources(folder)
        path = Path(self.path).expanduser()
        train, test = find_sources(path)
        if self.test_path is not None:
            if test is not None:
                raise ValueError(
                    f"data path {self.path!r} has its own test set ({test.files[0]}, ...): leave test_path unset "
                    f"or point path at the training images alone"
                )
            test, own_test = find_sources(Path(self.test_path).expanduser())
            if own_test is not None:
                raise ValueError(f"test_path {self.test_path!r} holds a train and a test set: point it at the test set")
        return train, test

    def cache_folder(self, source: ImageSource) -> Path:
        """A folder named for ``source``'s files (path, size, mtime) and the options that change the bytes."""
        scan_patch = self.scan_patch if self.scan == "patch" else 1
        digest = hashlib.sha256(
            f"v{CACHE_VERSION} {source.kind} {self.height}x{self.width}x{self.channels} {self.scan} {scan_patch} "
            f"{self.resize}\n".encode()
        )
        for f in source.files:
            stat = f.stat()
            digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        name = re.sub(r"[^\w-]", "_", source.name) or "images"
        return self.cache_dir / "images" / f"{name}-{digest.hexdigest()[:16]}"

    def prepare_data(self) -> None:
        """Download ``mnist`` or ``cifar10`` if asked for, then decode each source once into the cache."""
        if self.path in NAMED_SOURCES:
            download_named(self.path, self.cache_dir)
        for source in self.sources():
            if source is not None and not (self.cache_folder(source) / "meta.json").is_file():
                self.write_cache(source, self.cache_folder(source))

    def write_cache(self, source: ImageSource, folder: Path) -> None:
        """Decode every image of ``source`` into ``folder/images.bin``: uint8 (N, seq_len), scanned."""
        folder.mkdir(parents=True, exist_ok=True)
        partial_file = folder / "images.bin.part"
        n_images, skipped = 0, []
        try:
            with open(partial_file, "wb") as out:
                for name, load in source_items(source):
                    try:
                        item = load()
                        if isinstance(item, Image.Image):
                            item = image_pixels(item, self.height, self.width, self.channels, self.resize)[None]
                    except Exception as error:  # Pillow's decoders raise many exception types on bad files
                        if self.on_bad_file == "raise":
                            raise ValueError(f"cannot read image file {name}: {error}") from error
                        skipped.append(f"{name} ({error})")
                        continue
                    for start in range(0, len(item), CHUNK):  # (n, h, w, c) -> (n, H, W, C) -> (n, seq_len)
                        chunk = item[start : start + CHUNK]
                        pixels = fit_pixels(chunk, self.height, self.width, self.channels, self.resize)
                        out.write(pixels_to_bytes(pixels, self.scan, self.scan_patch).tobytes())
                    n_images += len(item)
        except BaseException:
            partial_file.unlink(missing_ok=True)
            raise
        if n_images == 0:
            partial_file.unlink()
            reason = f": all {len(skipped)} files are unreadable, e.g. {skipped[0]}" if skipped else ""
            raise ValueError(f"no readable images in {str(source.root)!r}{reason}")
        if skipped:
            shown = "; ".join(skipped[:10]) + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            warnings.warn(f"skipped {len(skipped)} unreadable file(s) in {str(source.root)!r}: {shown}", stacklevel=3)
        partial_file.rename(folder / "images.bin")
        meta = {"source": str(source.root), "images": n_images, "seq_len": self.seq_len, "skipped": skipped}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        log.info("cached %d images of %s in %s", n_images, source.root, folder)

    def cached_images(self, source: ImageSource) -> np.memmap:
        """The decoded images of ``source``: a read-only uint8 memory map (N, seq_len)."""
        folder = self.cache_folder(source)
        n_images = json.loads((folder / "meta.json").read_text())["images"]
        return np.memmap(folder / "images.bin", dtype=np.uint8, mode="r", shape=(n_images, self.seq_len))

    def patch_mismatch(self, patch_size: int) -> str | None:
        """In the patch scan a MegaByte patch should hold whole pixel blocks of scan_patch^2 x channels bytes
        (the paper: one block, 2 x 2 x 3 = 12 bytes for ImageNet 64); the raster scan has no block to match."""
        p, block = self.scan_patch, self.scan_patch**2 * self.channels
        if self.scan != "patch" or patch_size % block == 0:
            return None
        return (
            f"model patch_size {patch_size} is not a whole number of the patch scan's {p} x {p} x {self.channels} "
            f"= {block}-byte pixel blocks, so MegaByte's patches do not line up with them: use "
            f"--model.arch.init_args.patch_size {block} (one block, as in the paper), or data.scan_patch and "
            f"data.channels whose block is {patch_size} bytes"
        )

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the cached images and split them into train / val (/ test) by image."""
        if self.splits:
            return
        self.prepare_data()  # a no-op once cached; needed when the datamodule is used outside the Trainer
        train_source, test_source = self.sources()
        images = self.cached_images(train_source)
        n = len(images)
        order = np.random.default_rng(self.seed).permutation(n) if self.shuffle_split else np.arange(n)
        train, val, test = split_indices(n, self.split, order)
        if test_source is not None:
            train = np.sort(np.concatenate([train, test]))
            test_images = self.cached_images(test_source)
            self.splits["test"] = ImageRows(test_images, np.arange(len(test_images)))
        elif self.split[2] > 0:
            self.splits["test"] = ImageRows(images, test)
        self.splits["train"], self.splits["val"] = ImageRows(images, train), ImageRows(images, val)
        for name, rows in self.splits.items():
            if len(rows) == 0:
                raise ValueError(
                    f"the {name} split of {self.path!r} has no images ({n} in all): use more images or a larger "
                    f"{name} fraction in split"
                )

    # -- dataloaders ----------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """One pass over the training images per epoch in a seeded random order (drawn with replacement
        to fill one batch when there are fewer images than batch_size); the last short batch is dropped."""
        train = self.splits["train"]
        few = len(train) < self.batch_size
        return self._train_loader(train, self.batch_size if few else len(train), replacement=few)

    def eval_dataset(self, split: str) -> Dataset:
        """Every image of ``split`` once, in source order: uint8 tensors (seq_len,)."""
        if not self.splits:
            raise RuntimeError("call setup() before asking for a split")
        if split not in self.splits:
            raise ValueError(
                f"there is no {split} split: give test_path, or a positive test fraction in split (got {self.split})"
            )
        return self.splits[split]

    def encode_file(self, path: str | Path) -> torch.Tensor:
        """An image file -> its bytes as the model sees them (converted, resized, scanned): uint8 (seq_len,)."""
        try:
            image = read_image_file(Path(path))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read image file {str(path)!r}: {error}") from error
        pixels = image_pixels(image, self.height, self.width, self.channels, self.resize)
        return torch.from_numpy(pixels_to_bytes(pixels[None], self.scan, self.scan_patch).reshape(-1).copy())

    def cut_prompt(self, prompt: torch.Tensor, length: int) -> torch.Tensor:
        """An image's first ``length`` bytes: the model completes the rest of the image."""
        return prompt[:length]

    # -- bytes -> image -------------------------------------------------------------------------------

    def decode(self, data: Bytes) -> torch.Tensor:
        """Any bytes -> uint8 image (channels, height, width); short sequences are zero-padded."""
        return bytes_to_image(data, self.height, self.width, self.channels, self.scan, self.scan_patch)

    def save(self, data: Bytes, path: str | Path) -> Path:
        """Write the decoded image as a PNG to ``path`` with suffix ``.png``; returns the path written."""
        path = Path(path).with_suffix(".png")
        pixels = self.decode(data).permute(1, 2, 0).numpy()  # (H, W, C)
        Image.fromarray(pixels[..., 0] if self.channels == 1 else pixels).save(path)
        return path
