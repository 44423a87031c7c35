"""Images <-> bytes: any picture to pixels of the configured size and channels, pixels to their
byte sequence in scan order (``raster`` or ``patch``) and back. Pure functions, no files."""

import math
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from datamodules.base import Bytes, as_uint8, check_choice, check_positive

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


# -- image <-> bytes (pure) ---------------------------------------------------------------------


def image_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``image_size``, an int (square) or [height, width] -> (height, width)."""
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ValueError(f"image_size must be a positive int or [height, width], got {image_size!r}")
    return size


def check_scan(height: int, width: int, scan: str, scan_patch: int) -> None:
    """Raise a ValueError naming the option to fix unless ``scan`` can order a height x width image."""
    check_choice("scan", scan, ("raster", "patch"))
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
    check_positive("channels", channels)
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
