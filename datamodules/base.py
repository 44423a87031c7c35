"""What every modality's DataModule offers beyond Lightning's: bytes back to media.

A DataModule turns its media into byte sequences for training (``(x, mask)`` batches, see
``datamodules/windows.py``) and back again for people to look at: ``decode`` gives the medium
(text, an image tensor, a waveform), ``save`` writes it as a file of the medium's own format, and
``examples`` hands out validation sequences to prompt generation with. Sampling (``sampling.py``, for
the sample callback and ``cli.py generate``) uses only this interface, so switching modality is
switching the ``data:`` block.

It also holds what the modalities share: the checks of the options every DataModule has, the cache
folder, the identity of source files in a cache key and the contiguous split of a byte count.
"""

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.windows import PaddedWindows, ResumableSampler, pad_collate

Bytes = bytes | bytearray | np.ndarray | torch.Tensor
SPLITS = ("train", "val", "test")


def as_uint8(data: Bytes) -> np.ndarray:
    """Any byte container -> uint8 numpy array (N,). Tensors and arrays must hold values 0..255."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    data = np.asarray(data).reshape(-1)
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"byte values must be in 0..255, got {data.min()}..{data.max()}")
        data = data.astype(np.uint8)
    return data


# -- what the modalities share --------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$MEGABYTE_CACHE``, else ``$XDG_CACHE_HOME/megabyte``, else ``~/.cache/megabyte``."""
    if "MEGABYTE_CACHE" in os.environ:
        return Path(os.environ["MEGABYTE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megabyte"


@contextlib.contextmanager
def writing_cache(folder: Path, names: tuple[str, ...]) -> Iterator[dict[str, BinaryIO]]:
    """Open ``folder/<name>.part`` for writing for each of ``names``; when the block ends without an
    error, rename each to ``folder/<name>``. On any error (a bad file, a full disk, Ctrl-C) the ``.part``
    files are removed, and so are ``folder`` and its parents where this call made them and they are left
    empty: a failed write leaves nothing in the cache. (``meta.json``, which says a cache is complete, is
    the caller's to write after the block: ``write_meta``.)"""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    partials = {name: folder / f"{name}.part" for name in names}
    try:
        with contextlib.ExitStack() as stack:
            yield {name: stack.enter_context(open(partial, "wb")) for name, partial in partials.items()}
        for name, partial in partials.items():
            partial.rename(folder / name)
    except BaseException:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
        for made_folder in made:  # innermost first
            try:
                made_folder.rmdir()
            except OSError:  # not empty: something else is in it
                break
        raise


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write ``folder/meta.json`` (through a ``.part`` file and a rename): the mark of a complete cache."""
    partial = folder / "meta.json.part"
    partial.write_text(json.dumps(meta, indent=1))
    partial.rename(folder / "meta.json")


def listed_files(folder: Path, visible: bool = False) -> list[Path]:
    """Every file under ``folder``, sorted by path (with ``visible``, outside hidden files and folders).
    A broken symbolic link is skipped with a warning naming it and where it points."""
    files, broken = [], []
    for f in folder.rglob("*"):
        if visible and any(p.startswith(".") for p in f.relative_to(folder).parts):
            continue
        if f.is_file():
            files.append(f)
        elif f.is_symlink() and not f.exists():
            broken.append(f)
    for link in sorted(broken):
        message = f"skipping {str(link)!r} in data folder {str(folder)!r}: a broken link to {os.readlink(link)!r}"
        warnings.warn(message, stacklevel=3)
    return sorted(files)


def check_exists(path: Path, option: str = "data path") -> None:
    """Raise a FileNotFoundError naming ``option`` and ``path`` unless it exists (saying so for a broken link)."""
    if path.exists():
        return
    if path.is_symlink():
        target = os.readlink(path)
        raise FileNotFoundError(f"{option} {str(path)!r} is a broken link to {target!r}: point it at a file or folder that exists")
    raise FileNotFoundError(f"{option} {str(path)!r} does not exist")


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: a cut there fails to decompress


def check_tar_end(archive: Path, offset: int) -> None:
    """Raise a ValueError naming ``archive``, an uncompressed tar archive, if it is cut short: its last
    member (ending at byte ``offset``) is not followed by the end-of-archive marker, two zero blocks.
    Python's ``tarfile`` ends without an error at a cut between two members or inside a header."""
    with open(archive, "rb") as f:
        if f.read(6).startswith(COMPRESSED_MAGIC):
            return
        f.seek(offset)
        tail = f.read(1024)
    if len(tail) < 1024 or tail.strip(b"\0"):
        raise ValueError(f"cannot read the archive {str(archive)!r} (cut short after byte {offset}): replace it with a whole one")


def split_bounds(n_bytes: int, split: tuple[float, float, float]) -> list[int]:
    """Byte offsets [0, a, b, n] of a contiguous train / val / test split.

    a = floor(n * train), b = floor(n * (train + val)), computed exactly (no float rounding),
    so docs-prose's 84,283,424 bytes split at 75,855,081 and 80,069,252.
    """
    train, val, _ = (Fraction(str(f)) for f in split)
    return [0, int(n_bytes * train), int(n_bytes * (train + val)), n_bytes]


def hash_files(digest: Any, files: Iterable[Path]) -> None:
    """Add the identity of each of ``files`` (resolved path, size, mtime) to ``digest``, a ``hashlib``
    hash, so a cache key changes when a source file is edited, replaced or moved. The format must stay
    as it is: it names the cache folders already written."""
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def check_positive(option: str, value: int) -> None:
    """Raise a ValueError naming ``option`` unless ``value`` is at least 1."""
    if value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value}")


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``option`` and its ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{option} must be {' or '.join(repr(c) for c in choices)}, got {value!r}")


EVALUATION_ONLY = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0))
"""Splits of a data source that is only evaluated: all of it is the test split (``test``, ``predict``)
or the val split (``validate``)."""

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
"""The splits each Lightning stage reads (``setup(stage)``); any other stage (None) reads all three."""


def check_split(
    split: tuple[float, float, float], may_be_zero: tuple[str, ...] = (), evaluation_only: bool = True
) -> None:
    """Raise a ValueError unless ``split`` is three fractions (train, val, test) summing to 1, each
    positive but those named in ``may_be_zero``, which may be 0; with ``evaluation_only``, [0, 0, 1]
    and [0, 1, 0] are allowed too (``EVALUATION_ONLY``: ``setup`` refuses them for ``fit``)."""
    valid = (
        len(split) == 3
        and all(f >= 0 if name in may_be_zero else f > 0 for name, f in zip(SPLITS, split))
        and abs(sum(split) - 1.0) <= 1e-9
    )
    if valid or (evaluation_only and tuple(float(f) for f in split) in EVALUATION_ONLY):
        return
    if may_be_zero:
        positive = " and ".join(name for name in SPLITS if name not in may_be_zero)
        rule = f"three fractions (train, val, test) summing to 1 with {positive} positive"
    else:
        rule = "three positive fractions summing to 1 (train, val, test)"
    also = "; or [0, 0, 1] to test or predict on all of the data, [0, 1, 0] to validate on all of it" if evaluation_only else ""
    raise ValueError(f"split must be {rule}, e.g. [0.9, 0.05, 0.05]{also}; got {split}")


def check_stage_split(split: tuple[float, float, float], stage: str | None) -> None:
    """Raise a ValueError for ``fit`` (or any stage but validate, test and predict) on an evaluation-only
    split, which has no training data."""
    if split[0] == 0 and stage not in ("validate", "test", "predict"):
        raise ValueError(
            f"split {list(split)} is for evaluation only (no train split): fit needs positive train and val "
            f"fractions, e.g. --data.split [0.9, 0.05, 0.05]"
        )


class ByteDataModule(L.LightningDataModule):
    """Base of the text, image and audio DataModules.

    Subclasses pass the options every modality has to ``__init__``, set ``media`` ("text", "image" or
    "audio") and ``seq_len`` (bytes per sequence) and implement ``decode``, ``save`` and ``eval_dataset``.
    """

    media: str = "bytes"
    """How samples show a decoded sequence (``sampling.py``): "text", "image" or "audio"."""
    seq_len: int

    def __init__(self, batch_size: int, seed: int, num_workers: int, cache_dir: str | None) -> None:
        """The options every modality has (each subclass documents them): ``batch_size`` sequences per
        batch, ``seed`` of the training order, ``num_workers`` DataLoader worker processes and the
        ``cache_dir`` (None: ``default_cache_dir()``)."""
        super().__init__()
        check_positive("batch_size", batch_size)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    @classmethod
    def seq_len_from_args(cls, init_args: dict[str, Any]) -> int:
        """The sequence length the arguments ``init_args`` of ``__init__`` give, without building the
        DataModule. The CLI links it to the model's ``max_seq_len``."""
        return int(init_args["seq_len"])

    FORMAT_OPTIONS: tuple[str, ...] = ()
    """The ``__init__`` options that decide what the bytes mean (an image's size, channels and scan, audio's
    encoding and rate): a checkpoint trained with other values reads other data (the CLI refuses it)."""

    @classmethod
    def data_format(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """The ``FORMAT_OPTIONS`` of the arguments ``init_args`` of ``__init__`` (missing ones take its
        defaults), as plain values to compare."""
        args = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()} | init_args
        return {k: list(args[k]) if isinstance(args[k], tuple) else args[k] for k in cls.FORMAT_OPTIONS}

    @classmethod
    def shorter_seq_len(cls, init_args: dict[str, Any], max_seq_len: int) -> str:
        """The option (as a command-line argument) that makes sequences of the arguments ``init_args`` fit a
        model of ``max_seq_len``: here ``--data.seq_len``."""
        return f"--data.seq_len {max_seq_len}"

    def decode(self, data: Bytes) -> Any:
        """Any byte sequence -> the medium (never raises on byte content)."""
        raise NotImplementedError

    def save(self, data: Bytes, path: str | Path) -> Path:
        """Write ``data`` decoded as a file of the medium's format; ``path``'s suffix is replaced by the
        medium's (``.txt``, ``.png``, ``.wav``). Returns the path written."""
        raise NotImplementedError

    def patch_mismatch(self, patch_size: int) -> str | None:
        """Why MegaByte patches of ``patch_size`` bytes would cut across the units of this data (pixel
        blocks, audio samples), with the setting that fixes it; None when they do not. Here: None (text
        has no units of a fixed size). The CLI warns with it."""
        return None

    def encode_file(self, path: str | Path) -> torch.Tensor:
        """A file of the medium -> its bytes as the model sees them, uint8 (L,). Here: the file's
        bytes as they are; the image and audio DataModules decode and encode their media."""
        data = Path(path).read_bytes()
        if not data:
            raise ValueError(f"file {str(path)!r} is empty")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def cut_prompt(self, prompt: torch.Tensor, length: int) -> torch.Tensor:
        """A prompt too long for its sample -> at most ``length`` of its bytes: here its last ones, so the
        sample continues the end of the prompt. Images keep their first bytes (the model completes the
        rest of the image); audio keeps whole samples."""
        return prompt[len(prompt) - min(length, len(prompt)) :]

    def eval_dataset(self, split: str) -> Dataset:
        """The evaluation sequences of ``split`` ("val" or "test"): uint8 tensors (L,), L <= seq_len.
        Needs ``setup``."""
        raise NotImplementedError

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split (``predict`` gives the bits spent on each of its bytes)."""
        return self.test_dataloader()

    def examples(self, n: int, split: str = "val") -> list[torch.Tensor]:
        """``n`` sequences spread evenly over ``split`` (uint8 (L,) each), to prompt generation with.

        The last sequence, which may be a short remainder, is used only when there are no others."""
        check_positive("n", n)
        dataset = self.eval_dataset(split)
        candidates = len(dataset) - 1 if len(dataset) > 1 else 1
        indices = np.linspace(0, candidates - 1, min(n, candidates)).round().astype(int)
        return [dataset[int(i)] for i in indices]

    # -- the data of every process --------------------------------------------------------------------

    def _replicas(self) -> tuple[int, int]:
        """(number of processes sharing the data, this one's rank): Lightning's data-parallel size and
        rank under DDP or FSDP (any number of nodes), (1, 0) for a single process."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return (kwargs["num_replicas"], kwargs["rank"]) if kwargs else (1, 0)

    def _eval_loader(self, split: str) -> DataLoader:
        """The windows of ``split`` in order; shared by several processes, each window is evaluated once
        (process r of R takes windows r, r + R, ...) and every process runs as many batches, the last
        ones filled up with empty windows (``PaddedWindows``). val/test bpb, total bits over total
        bytes summed over the processes, is then the same as one process's."""
        dataset = self.eval_dataset(split)
        replicas, rank = self._replicas()
        if replicas == 1:
            return self._loader(dataset)
        padded = PaddedWindows(dataset, replicas)
        return self._loader(padded, sampler=DistributedSampler(padded, replicas, rank, shuffle=False))

    _train_sampler: ResumableSampler | None = None
    _resume_state: dict[str, int] | None = None

    def _train_loader(self, dataset: Dataset, num_samples: int, replacement: bool) -> DataLoader:
        """Training batches in an order set by (``seed``, pass) that resumes mid-pass: after
        ``load_state_dict`` it skips the windows of the pass a checkpoint had trained on, and deals the
        rest out over this run's processes, however many the checkpoint's run had (``ResumableSampler``).
        Each process's last short batch of a pass is dropped."""
        replicas, rank = self._replicas()
        if num_samples < self.batch_size * replicas:  # at least one batch for every process
            num_samples, replacement = self.batch_size * replicas, True
        state = self._resume_state or {}
        self._resume_state = None
        epoch = state.get("train_epoch", 0)
        self._train_sampler = ResumableSampler(
            len(dataset), num_samples, self.seed, replacement,
            epoch=epoch, start=min(self._trained_samples(state), num_samples), num_replicas=replicas, rank=rank,
        )  # fmt: skip
        if state:
            self._count_skipped_batches(self._skipped_batches(epoch))
        return self._loader(dataset, sampler=self._train_sampler, drop_last=True)

    def _trained_samples(self, state: dict[str, int]) -> int:
        """The windows of the pass under way that a checkpoint's run had trained on, all processes
        together. Older checkpoints counted the batches of each process (of this ``batch_size``, which the
        CLI takes from the checkpoint)."""
        if "train_samples" in state:
            return state["train_samples"]
        return state.get("train_batches", 0) * self.batch_size * state.get("train_processes", 1)

    def _skipped_batches(self, epoch: int) -> int:
        """The batches of pass ``epoch`` this process counts as done: a whole share's less those it gets
        of the pass's rest (the same in every process)."""
        sampler = self._train_sampler
        return len(sampler) // self.batch_size - sampler.share(epoch) // self.batch_size

    def _count_skipped_batches(self, batches: int) -> None:
        """Set the Trainer's count of the epoch's batches to ``batches``, the sampler's skipped ones.
        Lightning counts the batches of an epoch itself and ends it after ``len(train_dataloader)``; a
        resumed run starts from the checkpoint's count, which is the sampler's only when the checkpoint
        stopped mid-pass with as many processes and the same batch size (then nothing changes). Every
        count of the epoch moves by as many, so Lightning's restart logic sees what it saved."""
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        if loop is None:
            return
        current = loop.batch_progress.current
        shift = batches - current.processed
        for name in ("ready", "started", "processed", "completed"):
            setattr(current, name, getattr(current, name) + shift)

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints: the training pass in progress and how many of its windows the model has
        trained on, all processes together (from the Trainer's count of batches, not the DataLoader's,
        which prefetches; the same in every process)."""
        sampler = self._train_sampler
        if sampler is None or sampler.epoch is None:
            return dict(self._resume_state or {})
        batches = 0
        if self.trainer is not None:
            batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= len(sampler) // self.batch_size:  # the pass is over: the next one is due
            return {"train_epoch": sampler.epoch + 1, "train_samples": 0}
        trained = (batches - self._skipped_batches(sampler.epoch)) * self.batch_size * sampler.num_replicas
        return {"train_epoch": sampler.epoch, "train_samples": sampler.skipped(sampler.epoch) + trained}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """The next ``train_dataloader`` continues where the checkpoint's run stopped."""
        self._resume_state = dict(state_dict)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=pad_collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )
