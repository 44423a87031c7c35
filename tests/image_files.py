"""Tiny image datasets written on the fly, in the formats ``datamodules.image`` reads.

Plain functions (no pytest fixtures), importable by any test:
``--data.path=<write_image_folder(tmp_path / "images")> --data.image_size=8`` trains any
``configs/image/*.yaml``.
"""

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def random_pixels(n: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, height, width, channels), uniformly random."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, channels), dtype=np.uint8)


def write_image_folder(
    folder: Path, n: int = 12, size: int = 8, channels: int = 3, classes: int = 2, seed: int = 0
) -> Path:
    """Write ``n`` random ``size`` x ``size`` PNGs with ``channels`` (1 or 3) channels in an ImageFolder
    layout, ``folder/class_<k>/<i>.png``, image i in class i % classes. Returns ``folder``."""
    for i, pixels in enumerate(random_pixels(n, size, size, channels, seed)):
        file = folder / f"class_{i % classes}" / f"{i:04d}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(file)
    return folder


def write_idx_images(path: Path, images: np.ndarray) -> Path:
    """Write uint8 (N, H, W) as an MNIST idx3 file (magic 2051, big-endian header), gzipped if ``path``
    ends in ``.gz``. Returns ``path``."""
    n, height, width = images.shape
    header = np.array([2051, n, height, width], dtype=">u4").tobytes()
    data = header + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_cifar_batch(path: Path, images: np.ndarray) -> Path:
    """Write uint8 (N, 32, 32, 3) as a CIFAR-10 python batch: a pickled dict whose ``data`` is uint8
    (N, 3072), channel-planar (1024 red, 1024 green, 1024 blue values per row). Returns ``path``."""
    batch = {
        "batch_label": path.name,
        "labels": [i % 10 for i in range(len(images))],
        "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),  # (N, H, W, C) -> (N, C * H * W)
        "filenames": [f"{i:04d}.png" for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return path


def write_npz_batch(path: Path, images: np.ndarray) -> Path:
    """Write uint8 (N, s, s, 3) as a downsampled-ImageNet batch: ``data`` uint8 (N, 3 * s * s),
    channel-planar, and ``labels`` 1..1000. Returns ``path``."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (N, H, W, C) -> (N, C * H * W)
    np.savez(path, data=data, labels=np.arange(len(images)) % 1000 + 1)
    return path
