"""``AudioDataModule``: encodes the files of each split once into a cached byte stream in
``prepare_data``, memory-maps it in ``setup``, and turns bytes back into waveforms and WAV files."""

import hashlib
import json
import logging
import re
import warnings
import wave
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.audio.codec import BYTES_PER_SAMPLE, decode_bytes, encode_waveform, waveform_to_pcm16
from datamodules.audio.sources import file_names, read_files, read_waveform, source_files
from datamodules.audio.splits import assign_splits
from datamodules.base import SPLITS, ByteDataModule, Bytes, check_choice, check_split, hash_files, write_meta, writing_cache
from datamodules.windows import EvalWindows, RandomWindows

log = logging.getLogger(__name__)


class AudioDataModule(ByteDataModule):
    """A folder or tar archive of audio files as a stream of 16-bit PCM or mu-law bytes, split by file.

    Batches are ``(x, mask)``: ``x`` uint8 (B, seq_len) bytes, ``mask`` bool (B, seq_len), False on
    the padding of the last, shorter evaluation window. Training windows start on a sample boundary
    (an even byte for ``pcm16``); they may run from the end of one file into the next, as text
    windows run across documents.
    """

    media = "audio"

    def __init__(
        self,
        path: str,
        seq_len: int = 8192,
        batch_size: int = 16,
        sample_rate: int = 16000,
        encoding: Literal["pcm16", "mulaw"] = "pcm16",
        split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        test_pattern: str | None = None,
        val_pattern: str | None = None,
        seed: int = 0,
        on_bad_file: Literal["warn", "raise"] = "warn",
        num_workers: int = 2,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            path: A folder of audio files (all files under it, sorted by path) or a .tar / .tar.gz
                archive of them. WAV (PCM 8-32 bit, float), FLAC or anything libsndfile reads.
            seq_len: Bytes per training window, a multiple of the bytes per sample (2 for pcm16); the
                model's ``max_seq_len`` is linked to it.
            batch_size: Windows per batch.
            sample_rate: Every file is resampled to this rate, in Hz.
            encoding: ``pcm16``: 16-bit little-endian PCM, 2 bytes a sample (the paper's raw audio);
                ``mulaw``: 8-bit mu-law, 1 byte a sample.
            split: Fractions of the files for train / val / test, shared out at random (``seed``)
                among the splits that have no pattern; see ``assign_splits``.
            test_pattern: Regular expression (``re.search`` on the file's path inside the folder or
                archive): the files it matches are the test split. FSDD's official split: ``_[0-4]\\.wav$``.
            val_pattern: Regular expression: the files it matches (and test_pattern does not) are
                the val split.
            seed: Seed of the split by fractions and of the random training windows.
            on_bad_file: A file that is not complete, non-empty audio: ``warn`` skips it with a
                warning naming it, ``raise`` stops with an error naming it.
            num_workers: DataLoader worker processes.
            cache_dir: Where the encoded splits are kept; default ``$MEGABYTE_CACHE`` or
                ``~/.cache/megabyte``.
        """
        super().__init__(batch_size, seed, num_workers, cache_dir)
        if encoding not in BYTES_PER_SAMPLE:
            raise ValueError(f"encoding must be one of {list(BYTES_PER_SAMPLE)}, got {encoding!r}")
        step = BYTES_PER_SAMPLE[encoding]
        if seq_len < 1 or seq_len % step:
            raise ValueError(
                f"seq_len {seq_len} is not a positive multiple of {step}, the bytes of one {encoding} "
                f"sample: use e.g. seq_len {max(step, seq_len // step * step)}"
            )
        if sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
        check_split(split, may_be_zero=("val", "test"), evaluation_only=False)
        for option, pattern in (("test_pattern", test_pattern), ("val_pattern", val_pattern)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"{option} {pattern!r} is not a valid regular expression: {error}") from None
        check_choice("on_bad_file", on_bad_file, ("warn", "raise"))
        self.save_hyperparameters()
        self.path = path
        self.seq_len = seq_len
        self.sample_rate = sample_rate
        self.encoding = encoding
        self.bytes_per_sample = step
        self.split = tuple(float(f) for f in split)
        self.test_pattern = test_pattern
        self.val_pattern = val_pattern
        self.on_bad_file = on_bad_file
        self.splits: dict[str, np.ndarray] = {}
        self.files: dict[str, dict[str, int]] = {}
        """After ``setup``: split -> {file name: bytes it adds to the split}, in the split's order."""

    FORMAT_OPTIONS = ("encoding", "sample_rate")

    # -- audio files -> cached uint8 files ----------------------------------------------------

    def cache_folder(self, files: list[Path]) -> Path:
        """A folder named for the source and the identity (path, size, mtime) of its ``files``
        (``source_files``), and for every option that changes the bytes."""
        digest = hashlib.sha256()
        hash_files(digest, files)
        options = [self.sample_rate, self.encoding, self.split, self.test_pattern, self.val_pattern, self.seed]
        digest.update(json.dumps(options).encode())
        name = Path(self.path).name.replace(".", "_") or "audio"
        return self.cache_dir / "audio" / f"{name}-{digest.hexdigest()[:16]}"

    def _bad_file(self, name: str, reason: str) -> None:
        if self.on_bad_file == "raise":
            raise ValueError(f"bad audio file {name!r} in {self.path!r}: {reason} (on_bad_file='warn' skips it)")
        warnings.warn(f"skipping audio file {name!r} in {self.path!r}: {reason}", stacklevel=3)

    def prepare_data(self) -> None:
        """Decode every file once and write the encoded splits as ``{train,val,test}.bin``, with
        ``meta.json`` (the files of each split, the skipped files) written last."""
        source = Path(self.path).expanduser()
        files = source_files(source)
        folder = self.cache_folder(files)
        if (folder / "meta.json").is_file():
            for name, reason in json.loads((folder / "meta.json").read_text())["skipped"].items():
                self._bad_file(name, reason)  # the same report as when the cache was written
            return
        names = file_names(source, files)
        assignment = assign_splits(names, self.split, self.seed, self.test_pattern, self.val_pattern)
        split_of = {n: s for s, split_names in assignment.items() for n in split_names}
        written: dict[str, dict[str, int]] = {s: {} for s in SPLITS}  # split -> {name: bytes}
        skipped: dict[str, str] = {}  # name -> why
        with writing_cache(folder, tuple(f"{s}.bin" for s in SPLITS)) as outs:  # nothing is left if it fails
            for name, raw in read_files(source, files):
                try:
                    encoded = encode_waveform(read_waveform(raw, self.sample_rate), self.encoding)
                except ValueError as error:
                    self._bad_file(name, str(error))
                    skipped[name] = str(error)
                    continue
                outs[f"{split_of[name]}.bin"].write(encoded.tobytes())
                written[split_of[name]][name] = len(encoded)
            if not any(written.values()):
                raise ValueError(f"no readable audio in {self.path!r}: all {len(names)} files were skipped")
            for s in SPLITS:
                if not written[s]:
                    raise ValueError(
                        f"the {s} split of {self.path!r} has no readable audio: none of its {len(assignment[s])} "
                        f"file(s) could be read"
                    )
        meta = {
            "path": self.path,
            "sample_rate": self.sample_rate,
            "encoding": self.encoding,
            "n_bytes": {s: sum(written[s].values()) for s in SPLITS},
            "files": written,
            "skipped": skipped,
        }
        write_meta(folder, meta)
        log.info("cached %s (%s bytes) in %s", self.path, meta["n_bytes"], folder)

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the cached train / val / test bytes."""
        if self.splits:
            return
        folder = self.cache_folder(source_files(Path(self.path).expanduser()))
        if not (folder / "meta.json").is_file():
            self.prepare_data()  # e.g. when the datamodule is used outside the Trainer
        meta = json.loads((folder / "meta.json").read_text())
        for name in SPLITS:
            n_bytes = meta["n_bytes"][name]
            if n_bytes < self.seq_len:
                raise ValueError(
                    f"the {name} split of {self.path!r} has {n_bytes} bytes, fewer than one window of seq_len "
                    f"{self.seq_len}: use more or longer files, a larger split fraction or a smaller seq_len"
                )
        self.files = meta["files"]
        self.splits = {name: np.memmap(folder / f"{name}.bin", dtype=np.uint8, mode="r") for name in SPLITS}

    # -- dataloaders --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        # Windows start on sample boundaries, so no window begins with half a sample.
        windows = RandomWindows(self.splits["train"], self.seq_len, step=self.bytes_per_sample)
        # About one pass over the split's bytes per epoch, drawn with replacement; resumes mid-epoch.
        n_windows = max(self.batch_size, len(self.splits["train"]) // self.seq_len)
        return self._train_loader(windows, n_windows, replacement=True)

    def patch_mismatch(self, patch_size: int) -> str | None:
        """A MegaByte patch should hold whole samples (the paper's audio patch: 32 bytes, 16 samples of pcm16)."""
        if patch_size % self.bytes_per_sample == 0:
            return None
        lower = patch_size // self.bytes_per_sample * self.bytes_per_sample
        choices = " or ".join(str(n) for n in (lower, lower + self.bytes_per_sample) if n > 0)
        return (
            f"model patch_size {patch_size} is not a whole number of {self.encoding} samples "
            f"({self.bytes_per_sample} bytes each), so MegaByte's patches split samples: use "
            f"--model.arch.init_args.patch_size {choices}"
        )

    def eval_dataset(self, split: str) -> Dataset:
        """Consecutive windows of ``seq_len`` bytes covering the split once (the last may be shorter)."""
        return EvalWindows(self.splits[split], self.seq_len)

    def encode_file(self, path: str | Path) -> torch.Tensor:
        """An audio file -> its bytes as the model sees them (mono, resampled, encoded): uint8 (L,)."""
        try:
            waveform = read_waveform(Path(path).read_bytes(), self.sample_rate)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read audio file {str(path)!r}: {error}") from error
        return torch.from_numpy(encode_waveform(waveform, self.encoding).copy())

    def cut_prompt(self, prompt: torch.Tensor, length: int) -> torch.Tensor:
        """The last whole samples of a clip, at most ``length`` bytes: the sample continues its end."""
        return super().cut_prompt(prompt, length - length % BYTES_PER_SAMPLE[self.encoding])

    # -- bytes -> audio -----------------------------------------------------------------------

    def decode(self, data: Bytes) -> tuple[torch.Tensor, int]:
        """Any bytes -> (waveform float32 (N,) in [-1, 1], sample rate in Hz). For pcm16 an odd
        trailing byte is dropped."""
        return decode_bytes(data, self.encoding), self.sample_rate

    def save(self, data: Bytes, path: str | Path) -> Path:
        """Write the decoded bytes as a mono 16-bit PCM WAV at ``sample_rate`` to ``path`` with suffix ``.wav``."""
        path = Path(path).with_suffix(".wav")
        waveform, sample_rate = self.decode(data)
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(sample_rate)
            f.writeframes(waveform_to_pcm16(waveform).tobytes())
        return path
