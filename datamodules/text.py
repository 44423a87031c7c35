"""Text (or any file) as a raw byte stream.

``path`` names a file (plain or ``.gz``), a folder (every file under it, sorted by path,
concatenated byte for byte) or a named corpus: ``python-stdlib`` (the ``.py`` files of the
running interpreter's standard library, present on every machine) or ``enwik8`` (downloaded
in ``prepare_data``). Nothing is decoded: any byte content works.

The corpus is split contiguously by bytes (90 / 5 / 5 by default), written once as a uint8
file in a cache folder and memory-mapped, so a corpus larger than RAM works.
"""

import gzip
import hashlib
import logging
import shutil
import sysconfig
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from datamodules.base import (
    SPLITS,
    STAGE_SPLITS,
    ByteDataModule,
    Bytes,
    as_uint8,
    check_exists,
    check_positive,
    check_split,
    check_stage_split,
    hash_files,
    listed_files,
    split_bounds,
    write_meta,
    writing_cache,
)
from datamodules.windows import EvalWindows, RandomWindows

log = logging.getLogger(__name__)

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000
NAMED_CORPORA = ("python-stdlib", "enwik8")


def python_stdlib_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, sorted by path
    (installed packages under ``site-packages`` / ``dist-packages`` are not part of it)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        f
        for f in root.rglob("*.py")
        if f.is_file() and not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts)
    )


def corpus_files(path: Path) -> list[Path]:
    """A file is itself; a folder is every file under it, sorted by path (broken links skipped, with a warning)."""
    check_exists(path)
    if path.is_file():
        return [path]
    files = listed_files(path)
    if not files:
        raise ValueError(f"data folder {str(path)!r} contains no files")
    return files


def read_chunks(file: Path, chunk_size: int = 1 << 22):
    """Yield the bytes of ``file`` in chunks, decompressing ``.gz`` files; a ``.gz`` that is not gzip or is
    cut short raises a ValueError naming it."""
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        why = "cut short" if isinstance(error, EOFError) else f"not gzip data: {error}"
        raise ValueError(f"data file {str(file)!r} is not a complete .gz file ({why}): replace it with a whole one") from None


def download_enwik8(folder: Path) -> Path:
    """Download and unzip enwik8 into ``folder`` unless it is there; check its size."""
    target = folder / "enwik8"
    if target.is_file() and target.stat().st_size == ENWIK8_BYTES:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "enwik8.zip"
    if not archive.is_file():
        log.info("downloading %s to %s", ENWIK8_URL, archive)
        partial = archive.with_suffix(".zip.part")
        try:
            with urllib.request.urlopen(ENWIK8_URL, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
                expected = response.headers.get("Content-Length")
            if expected is not None and partial.stat().st_size != int(expected):
                raise OSError(f"the connection closed after {partial.stat().st_size} of {expected} bytes")
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise RuntimeError(
                f"enwik8 is not in {folder} and could not be downloaded from {ENWIK8_URL} ({error}). "
                f"Download it yourself and pass its path as data.path."
            ) from error
        partial.rename(archive)
    partial = folder / "enwik8.part"
    try:
        with zipfile.ZipFile(archive) as zf, zf.open("enwik8") as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out)  # the zip's CRC is checked as it is read
    except (zipfile.BadZipFile, KeyError) as error:  # e.g. an archive truncated by an earlier run
        partial.unlink(missing_ok=True)
        archive.unlink()
        raise RuntimeError(f"{archive} is not a complete enwik8 archive ({error}); removed it, try again") from error
    size = partial.stat().st_size
    if size != ENWIK8_BYTES:
        partial.unlink()
        archive.unlink()
        raise RuntimeError(f"enwik8 from {archive} has {size} bytes, expected {ENWIK8_BYTES}; removed it, try again")
    partial.rename(target)
    return target


def bytes_to_text(data: Bytes) -> str:
    """Bytes -> str, decoded as UTF-8 with invalid sequences replaced by U+FFFD."""
    return as_uint8(data).tobytes().decode("utf-8", errors="replace")


class TextDataModule(ByteDataModule):
    """Any file, folder or named corpus as a stream of bytes, split contiguously.

    Batches are ``(x, mask)``: ``x`` uint8 (B, seq_len) bytes, ``mask`` bool (B, seq_len),
    False on the padding of the last, shorter evaluation window.
    """

    media = "text"

    def __init__(
        self,
        path: str = "python-stdlib",
        seq_len: int = 1024,
        batch_size: int = 16,
        split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        seed: int = 0,
        num_workers: int = 2,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            path: A file (plain or .gz), a folder (all files, sorted by path, concatenated), or a
                named corpus: ``python-stdlib`` (offline, on every machine) or ``enwik8``.
            seq_len: Bytes per training window; the model's ``max_seq_len`` is linked to it.
            batch_size: Windows per batch.
            split: Fractions of the corpus for train / val / test, contiguous, in that order. [0, 0, 1]
                makes all of it the test split (``test`` and ``predict`` score every byte), [0, 1, 0] the
                val split (``validate``); ``fit`` refuses them.
            seed: Seed of the random training windows.
            num_workers: DataLoader worker processes.
            cache_dir: Where split corpora (and downloads) are kept; default ``$MEGABYTE_CACHE``
                or ``~/.cache/megabyte``.
        """
        super().__init__(batch_size, seed, num_workers, cache_dir)
        check_positive("seq_len", seq_len)
        check_split(split)
        self.save_hyperparameters()
        self.path = path
        self.seq_len = seq_len
        self.split = tuple(split)
        self.splits: dict[str, np.ndarray] = {}

    # -- corpus -> cached uint8 file ------------------------------------------------------------

    def source_files(self) -> list[Path]:
        if self.path == "python-stdlib":
            return python_stdlib_files()
        if self.path == "enwik8":
            target = self.cache_dir / "enwik8" / "enwik8"
            if not target.is_file():
                raise FileNotFoundError(f"enwik8 is not downloaded yet (expected at {target}); prepare_data does it")
            return [target]
        return corpus_files(Path(self.path).expanduser())

    def cache_folder(self, files: list[Path]) -> Path:
        """A folder named for the corpus and the identity (path, size, mtime) of its ``files``."""
        digest = hashlib.sha256()
        hash_files(digest, files)
        name = Path(self.path).name.replace(".", "_") or "corpus"
        return self.cache_dir / "corpora" / f"{name}-{digest.hexdigest()[:16]}"

    def prepare_data(self) -> None:
        """Download enwik8 if asked for, then write the corpus once as ``bytes.bin``."""
        if self.path == "enwik8":
            download_enwik8(self.cache_dir / "enwik8")
        files = self.source_files()
        folder = self.cache_folder(files)
        if (folder / "meta.json").is_file():
            return
        n_bytes = 0
        with writing_cache(folder, ("bytes.bin",)) as out:  # nothing is left in the cache if this fails
            for file in files:
                for chunk in read_chunks(file):
                    out["bytes.bin"].write(chunk)
                    n_bytes += len(chunk)
            if n_bytes == 0:
                raise ValueError(f"data path {self.path!r} holds no bytes (empty file or files)")
        write_meta(folder, {"path": self.path, "n_bytes": n_bytes})
        log.info("cached %s (%d bytes) in %s", self.path, n_bytes, folder)

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the cached corpus and cut it into the train / val / test splits. Those ``stage``
        reads must hold a window (``fit``) or a byte (``validate``, ``test``, ``predict``)."""
        check_stage_split(self.split, stage)
        if not self.splits:
            folder = self.cache_folder(self.source_files())
            if not (folder / "meta.json").is_file():
                self.prepare_data()  # e.g. when the datamodule is used outside the Trainer
            data = np.memmap(folder / "bytes.bin", dtype=np.uint8, mode="r")
            bounds = split_bounds(len(data), self.split)
            self.splits = {name: data[start:end] for name, start, end in zip(SPLITS, bounds[:-1], bounds[1:])}
        evaluating = stage in ("validate", "test", "predict")
        for name in STAGE_SPLITS.get(stage, SPLITS):
            n_bytes = len(self.splits[name])
            if evaluating and n_bytes == 0:
                n_all = sum(len(split) for split in self.splits.values())
                raise ValueError(
                    f"the {name} split of {self.path!r} is empty ({n_all} bytes in all): give a larger {name} "
                    f"fraction in split, e.g. --data.split {'[0, 1, 0]' if name == 'val' else '[0, 0, 1]'} for all of it"
                )
            if not evaluating and n_bytes < self.seq_len:
                raise ValueError(
                    f"the {name} split of {self.path!r} has {n_bytes} bytes, fewer than one window "
                    f"of seq_len {self.seq_len}: use a larger corpus, a larger split fraction or a "
                    f"smaller seq_len"
                )

    # -- dataloaders --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        windows = RandomWindows(self.splits["train"], self.seq_len)
        # About one pass over the split's bytes per epoch, drawn with replacement.
        n_windows = max(self.batch_size, len(self.splits["train"]) // self.seq_len)
        return self._train_loader(windows, n_windows, replacement=True)

    def eval_dataset(self, split: str) -> Dataset:
        """Consecutive windows of ``seq_len`` bytes covering the split once (the last may be shorter)."""
        return EvalWindows(self.splits[split], self.seq_len)

    # -- bytes -> text ------------------------------------------------------------------------

    def decode(self, data: Bytes) -> str:
        """Bytes -> str, invalid UTF-8 replaced by U+FFFD."""
        return bytes_to_text(data)

    def save(self, data: Bytes, path: str | Path) -> Path:
        """Write the bytes as they are (any encoding survives) to ``path`` with suffix ``.txt``."""
        path = Path(path).with_suffix(".txt")
        path.write_bytes(as_uint8(data).tobytes())
        return path
