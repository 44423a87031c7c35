"""``ImageDataModule``: decodes each image source once into a cache of uint8 (N, seq_len) rows in
``prepare_data``, memory-maps and splits it in ``setup``, and turns bytes back into images."""

import hashlib
import inspect
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.base import (
    SPLITS,
    STAGE_SPLITS,
    ByteDataModule,
    Bytes,
    check_choice,
    check_split,
    check_stage_split,
    hash_files,
    write_meta,
    writing_cache,
)
from datamodules.image.codec import bytes_to_image, check_scan, fit_pixels, image_hw, image_pixels, pixels_to_bytes
from datamodules.image.downloads import NAMED_SOURCES, download_named, named_folder
from datamodules.image.sources import ImageSource, find_sources, read_image_file, source_items
from datamodules.image.splits import ImageRows, split_indices

log = logging.getLogger(__name__)

CHUNK = 4096  # images converted and written at a time from an array source
CACHE_VERSION = 1  # part of the cache key: bump it when decoding changes, so old caches are not reused


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
                to 1). The test fraction goes to train when there is a separate test source. [0, 0, 1] makes
                every image the test split (for ``test`` and ``predict``), [0, 1, 0] the val split.
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
        super().__init__(batch_size, seed, num_workers, cache_dir)
        self.height, self.width = image_hw(image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        check_scan(self.height, self.width, scan, scan_patch)
        check_choice("resize", resize, ("resize", "crop"))
        check_choice("on_bad_file", on_bad_file, ("warn", "raise"))
        check_split(split, may_be_zero=("test",))
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

    FORMAT_OPTIONS = ("image_size", "channels", "scan", "scan_patch")

    @classmethod
    def data_format(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """The image's [height, width], channels and scan (scan_patch None in the raster scan, which has none)."""
        options = super().data_format(init_args)
        options["image_size"] = list(image_hw(options["image_size"]))
        if options["scan"] == "raster":
            options["scan_patch"] = None
        return options

    @classmethod
    def shorter_seq_len(cls, init_args: dict[str, Any], max_seq_len: int) -> str:
        """The largest square ``--data.image_size`` whose images fit ``max_seq_len`` bytes (a multiple of
        scan_patch in the patch scan)."""
        args = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()} | init_args
        step = int(args["scan_patch"]) if args["scan"] == "patch" else 1
        side = math.isqrt(max_seq_len // int(args["channels"])) // step * step
        return f"--data.image_size {side}" if side else f"--data.channels 1 --data.image_size {math.isqrt(max_seq_len)}"

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
            test, own_test = find_sources(Path(self.test_path).expanduser(), "test_path")
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
        hash_files(digest, source.files)
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
        """Decode every image of ``source`` into ``folder/images.bin``: uint8 (N, seq_len), scanned.
        Nothing is left in the cache when it fails."""
        n_images, skipped = 0, []
        with writing_cache(folder, ("images.bin",)) as out:
            for name, load in source_items(source):
                try:
                    item = load()
                    if isinstance(item, Image.Image):
                        item = image_pixels(item, self.height, self.width, self.channels, self.resize)[None]
                except Exception as error:  # Pillow's decoders raise many exception types on bad files
                    if self.on_bad_file == "raise":
                        raise ValueError(f"cannot read image file {name}: {error} (on_bad_file='warn' skips it)") from error
                    skipped.append(f"{name} ({error})")
                    continue
                for start in range(0, len(item), CHUNK):  # (n, h, w, c) -> (n, H, W, C) -> (n, seq_len)
                    chunk = item[start : start + CHUNK]
                    pixels = fit_pixels(chunk, self.height, self.width, self.channels, self.resize)
                    out["images.bin"].write(pixels_to_bytes(pixels, self.scan, self.scan_patch).tobytes())
                n_images += len(item)
            if n_images == 0:
                reason = f": all {len(skipped)} files are unreadable, e.g. {skipped[0]}" if skipped else ""
                raise ValueError(f"no readable images in {str(source.root)!r}{reason}")
        if skipped:
            shown = "; ".join(skipped[:10]) + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            warnings.warn(f"skipped {len(skipped)} unreadable file(s) in {str(source.root)!r}: {shown}", stacklevel=3)
        write_meta(folder, {"source": str(source.root), "images": n_images, "seq_len": self.seq_len, "skipped": skipped})
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
        """Memory-map the cached images and split them into train / val (/ test) by image; each split
        ``stage`` reads must hold an image."""
        check_stage_split(self.split, stage)
        if self.splits:
            return self._check_splits(stage)
        self.prepare_data()  # a no-op once cached; needed when the datamodule is used outside the Trainer
        train_source, test_source = self.sources()
        images = self.cached_images(train_source)
        n = self.n_images = len(images)
        order = np.random.default_rng(self.seed).permutation(n) if self.shuffle_split else np.arange(n)
        train, val, test = split_indices(n, self.split, order)
        if test_source is not None:
            train = np.sort(np.concatenate([train, test]))
            test_images = self.cached_images(test_source)
            self.splits["test"] = ImageRows(test_images, np.arange(len(test_images)))
        elif self.split[2] > 0:
            self.splits["test"] = ImageRows(images, test)
        self.splits["train"], self.splits["val"] = ImageRows(images, train), ImageRows(images, val)
        self._check_splits(stage)

    def _check_splits(self, stage: str | None) -> None:
        for name in STAGE_SPLITS.get(stage, SPLITS):
            if name in self.splits and len(self.splits[name]) == 0:
                raise ValueError(
                    f"the {name} split of {self.path!r} has no images ({self.n_images} in all): use more images or a larger "
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
