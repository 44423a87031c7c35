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

``codec`` holds pictures -> pixels -> bytes and back, ``sources`` the layouts and readers of the
formats above, ``downloads`` the torchvision datasets, ``splits`` the rows of each split and
``datamodule`` the ``ImageDataModule`` that ties them to a cache.
"""

from datamodules.image.codec import bytes_to_image, image_to_bytes, pixels_to_bytes
from datamodules.image.datamodule import ImageDataModule

__all__ = ["ImageDataModule", "bytes_to_image", "image_to_bytes", "pixels_to_bytes"]
