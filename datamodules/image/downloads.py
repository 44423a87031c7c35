"""The named sources ``mnist`` and ``cifar10``: torchvision downloads their raw files into
``cache_dir/torchvision``, checked against torchvision's own MD5 lists."""

import logging
from pathlib import Path

import torchvision
from torchvision.datasets.utils import check_integrity

log = logging.getLogger(__name__)

NAMED_SOURCES = ("mnist", "cifar10")


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
