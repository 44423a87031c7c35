"""Audio files as a byte stream: 16-bit PCM (the paper's raw format) or 8-bit mu-law.

``path`` names a folder of audio files (every file under it, sorted by path) or a ``.tar`` /
``.tar.gz`` archive of them (read directly, members in archive order). Any format libsndfile reads
works: WAV (PCM 8/16/24/32-bit, float 32/64), FLAC, ...; any sample rate, mono or stereo. Each file
is mixed to mono (the mean of its channels), resampled to ``sample_rate`` and encoded as bytes:

- ``pcm16``: 16-bit signed little-endian PCM, 2 bytes a sample (what the paper models);
- ``mulaw``: 8-bit mu-law (256 levels), 1 byte a sample.

Splits are made by file, never inside one: ``test_pattern`` / ``val_pattern`` claim the files whose
name matches, and the others are shuffled (seeded) and shared out by the ``split`` fractions (see
``assign_splits``). Each split is its files' bytes concatenated, written once as a uint8 file in a
cache folder and memory-mapped. A file that cannot be read as audio is skipped with a warning
naming it (or raises, with ``on_bad_file="raise"``).
"""

import contextlib
import hashlib
import io
import json
import logging
import re
import tarfile
import warnings
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF
from torch.utils.data import DataLoader, Dataset

from datamodules.base import ByteDataModule, Bytes, as_uint8
from datamodules.text import default_cache_dir
from datamodules.windows import EvalWindows, RandomWindows

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BYTES_PER_SAMPLE = {"pcm16": 2, "mulaw": 1}
MULAW_LEVELS = 256
PCM16_SCALE = 32768  # int16 value k <-> amplitude k / 32768, so -32768 is exactly -1.0

# -- waveform <-> bytes -----------------------------------------------------------------------


def _clipped(waveform: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any waveform -> float64 (N,) in [-1, 1]; NaN becomes 0, +-inf becomes +-1."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().double().numpy()
    waveform = np.asarray(waveform, dtype=np.float64).reshape(-1)
    return np.clip(np.nan_to_num(waveform, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def waveform_to_pcm16(waveform: torch.Tensor | np.ndarray) -> np.ndarray:
    """float (N,), amplitude in [-1, 1] (clipped) -> uint8 (2N,): int16 round(x * 32768), little-endian.

    +1.0 becomes 32767, the largest int16; ``pcm16_to_waveform`` inverts it within 1 / 32768.
    """
    samples = np.clip(np.rint(_clipped(waveform) * PCM16_SCALE), -PCM16_SCALE, PCM16_SCALE - 1)
    return samples.astype("<i2").view(np.uint8)


def pcm16_to_waveform(data: Bytes) -> torch.Tensor:
    """Any bytes (2N or 2N + 1), read as int16 little-endian -> float32 (N,) in [-1, 1).

    An odd trailing byte (half a sample) is dropped. Bytes -> waveform -> bytes is exact.
    """
    data = as_uint8(data)
    samples = np.ascontiguousarray(data[: len(data) // 2 * 2]).view("<i2")
    return torch.from_numpy(samples.astype(np.float32) / PCM16_SCALE)


def waveform_to_mulaw(waveform: torch.Tensor | np.ndarray) -> np.ndarray:
    """float (N,), amplitude in [-1, 1] (clipped) -> uint8 (N,): mu-law codes 0..255 (mu = 255)."""
    codes = AF.mu_law_encoding(torch.from_numpy(_clipped(waveform)), MULAW_LEVELS)
    return codes.numpy().astype(np.uint8)


def mulaw_to_waveform(data: Bytes) -> torch.Tensor:
    """Any bytes (N,), each a mu-law code -> float32 (N,) in [-1, 1]. Within one quantization
    step of the waveform ``waveform_to_mulaw`` encoded; codes -> waveform -> codes is exact."""
    codes = torch.from_numpy(as_uint8(data).astype(np.int64))
    return AF.mu_law_decoding(codes, MULAW_LEVELS).float()


def encode_waveform(waveform: torch.Tensor | np.ndarray, encoding: str) -> np.ndarray:
    """float (N,) in [-1, 1] -> uint8 (N * bytes per sample,) in ``encoding`` ("pcm16" or "mulaw")."""
    return waveform_to_pcm16(waveform) if encoding == "pcm16" else waveform_to_mulaw(waveform)


def decode_bytes(data: Bytes, encoding: str) -> torch.Tensor:
    """Any bytes in ``encoding`` ("pcm16" or "mulaw") -> float32 (N,) in [-1, 1]; never raises on content."""
    return pcm16_to_waveform(data) if encoding == "pcm16" else mulaw_to_waveform(data)


# -- audio files -> waveforms -----------------------------------------------------------------


def wav_missing_bytes(raw: bytes) -> int:
    """How many bytes the ``data`` chunk of a RIFF/WAVE file declares but the file lacks (0 when
    complete, not a WAV, or written by a stream with the unknown-length marker 0xFFFFFFFF).

    libsndfile reads a truncated WAV without complaint, so truncation is checked here.
    """
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return 0
    pos = 12
    while pos + 8 <= len(raw):
        chunk_id, size = raw[pos : pos + 4], int.from_bytes(raw[pos + 4 : pos + 8], "little")
        if chunk_id == b"data":
            return 0 if size == 0xFFFFFFFF else max(0, size - (len(raw) - pos - 8))
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return 0


def read_waveform(raw: bytes, sample_rate: int) -> torch.Tensor:
    """The bytes of an audio file -> float32 (N,) in [-1, 1] (floats are clipped when encoded), mono
    (the mean of the channels), resampled to ``sample_rate`` Hz.

    Raises ValueError, saying why, for anything but complete, non-empty, finite audio.
    """
    try:
        frames, file_rate = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)  # (T, C)
    except soundfile.SoundFileError as error:
        reason = getattr(error, "error_string", str(error)).rstrip(".")  # libsndfile's words, without its file object
        raise ValueError(f"not a readable audio file (libsndfile: {reason})") from error
    if (missing := wav_missing_bytes(raw)) > 0:
        raise ValueError(f"truncated: its WAV data chunk lacks {missing} bytes")
    if frames.size == 0:
        raise ValueError("holds no samples")
    if not np.isfinite(frames).all():
        raise ValueError("holds non-finite samples (NaN or infinity)")
    waveform = torch.from_numpy(frames.mean(axis=1))  # (T,)
    if file_rate != sample_rate:
        waveform = AF.resample(waveform, orig_freq=file_rate, new_freq=sample_rate)  # (ceil(T * new / old),)
    return waveform


def source_files(path: Path) -> list[Path]:
    """A folder: every file under it, sorted by path; a tar archive (.tar, .tar.gz, ...): itself."""
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        if not files:
            raise ValueError(f"data folder {str(path)!r} contains no files")
        return files
    if not tarfile.is_tarfile(path):
        raise ValueError(
            f"data path {str(path)!r} is a file but not a tar archive: give a folder of audio files "
            f"or a .tar / .tar.gz of them"
        )
    return [path]


def file_names(path: Path, files: list[Path]) -> list[str]:
    """The names of the ``source_files`` of ``path``: paths relative to the folder, or the member
    names of the archive's regular files in archive order. Patterns are matched against them."""
    if path.is_dir():
        return [f.relative_to(path).as_posix() for f in files]
    with tarfile.open(path) as tar:
        names = [member.name for member in tar.getmembers() if member.isfile()]
    if not names:
        raise ValueError(f"archive {str(path)!r} contains no files")
    return names


def read_files(path: Path, files: list[Path]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, raw bytes)`` of every file ``file_names`` names, in the same order."""
    if path.is_dir():
        for f in files:
            yield f.relative_to(path).as_posix(), f.read_bytes()
        return
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


# -- files -> splits --------------------------------------------------------------------------


def assign_splits(
    names: list[str],
    split: tuple[float, float, float],
    seed: int,
    test_pattern: str | None = None,
    val_pattern: str | None = None,
) -> dict[str, list[str]]:
    """Give each file name to exactly one of train / val / test.

    ``test_pattern`` claims the names it matches (``re.search``) for test; ``val_pattern`` then
    claims the remaining names it matches for val. A split with a pattern ignores its ``split``
    fraction. The n names left are shuffled (seeded by ``seed``) and shared among the splits without a
    pattern in proportion to their fractions: val and test take ``max(1, round(n * share))`` names
    each, share = their fraction / the sum of the fractions of the splits without a pattern (none for
    a fraction of 0); train takes the rest. So with ``test_pattern`` and ``split=(0.9, 0.1, 0.0)``,
    val is 10 % of the files the pattern leaves; with the default ``(0.9, 0.05, 0.05)``, 0.05 / 0.95.

    Returns ``{split: names}``, each list in the order of ``names``. Raises ValueError if a split
    would get no file.
    """
    patterns = {"test": test_pattern, "val": val_pattern}  # test first: it wins a name both match
    claimed: dict[str, str] = {}  # name -> split
    for s, pattern in patterns.items():
        if pattern is not None:
            matches = [n for n in names if n not in claimed and re.search(pattern, n)]
            if not matches:
                raise ValueError(
                    f"{s}_pattern {pattern!r} matches none of the {len(names) - len(claimed)} file names "
                    f"left to it (e.g. {names[0]!r})"
                )
            claimed.update((n, s) for n in matches)

    rest = [n for n in names if n not in claimed]
    free = {s: f for s, f in zip(SPLITS, split) if patterns.get(s) is None}  # splits shared out by fraction
    total = sum(free.values())
    order = np.random.default_rng(seed).permutation(len(rest))
    start = 0
    for s in ("val", "test"):
        if s not in free:
            continue
        if free[s] == 0:
            raise ValueError(f"the {s} split gets no files: give it a positive fraction in split, or a {s}_pattern")
        count = max(1, round(len(rest) * free[s] / total))
        claimed.update((rest[i], s) for i in order[start : start + count])
        start += count
    claimed.update((rest[i], "train") for i in order[start:])
    assignment = {s: [n for n in names if claimed[n] == s] for s in SPLITS}
    if not assignment["train"]:
        counts = ", ".join(f"{len(assignment[s])} {s}" for s in ("val", "test"))
        raise ValueError(
            f"no file is left for the train split ({len(names)} files: {counts}): use more files or smaller "
            f"val / test shares"
        )
    return assignment


# -- the DataModule ---------------------------------------------------------------------------


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
        super().__init__()
        if encoding not in BYTES_PER_SAMPLE:
            raise ValueError(f"encoding must be one of {list(BYTES_PER_SAMPLE)}, got {encoding!r}")
        step = BYTES_PER_SAMPLE[encoding]
        if seq_len < 1 or seq_len % step:
            raise ValueError(
                f"seq_len {seq_len} is not a positive multiple of {step}, the bytes of one {encoding} "
                f"sample: use e.g. seq_len {max(step, seq_len // step * step)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
        if len(split) != 3 or any(f < 0 for f in split) or split[0] <= 0 or abs(sum(split) - 1.0) > 1e-9:
            raise ValueError(f"split must be three fractions >= 0 summing to 1, train's positive; got {split}")
        for option, pattern in (("test_pattern", test_pattern), ("val_pattern", val_pattern)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"{option} {pattern!r} is not a valid regular expression: {error}") from None
        if on_bad_file not in ("warn", "raise"):
            raise ValueError(f"on_bad_file must be 'warn' or 'raise', got {on_bad_file!r}")
        self.save_hyperparameters()
        self.path = path
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.sample_rate = sample_rate
        self.encoding = encoding
        self.bytes_per_sample = step
        self.split = tuple(float(f) for f in split)
        self.test_pattern = test_pattern
        self.val_pattern = val_pattern
        self.seed = seed
        self.on_bad_file = on_bad_file
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.splits: dict[str, np.ndarray] = {}
        self.files: dict[str, dict[str, int]] = {}
        """After ``setup``: split -> {file name: bytes it adds to the split}, in the split's order."""

    # -- audio files -> cached uint8 files ----------------------------------------------------

    def cache_folder(self, files: list[Path]) -> Path:
        """A folder named for the source and the identity (path, size, mtime) of its ``files``
        (``source_files``), and for every option that changes the bytes."""
        digest = hashlib.sha256()
        for f in files:
            stat = f.stat()
            digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
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
        folder.mkdir(parents=True, exist_ok=True)
        partials = {s: folder / f"{s}.bin.part" for s in SPLITS}
        written: dict[str, dict[str, int]] = {s: {} for s in SPLITS}  # split -> {name: bytes}
        skipped: dict[str, str] = {}  # name -> why
        try:
            with contextlib.ExitStack() as stack:
                outs = {s: stack.enter_context(open(partials[s], "wb")) for s in SPLITS}
                for name, raw in read_files(source, files):
                    try:
                        encoded = encode_waveform(read_waveform(raw, self.sample_rate), self.encoding)
                    except ValueError as error:
                        self._bad_file(name, str(error))
                        skipped[name] = str(error)
                        continue
                    outs[split_of[name]].write(encoded.tobytes())
                    written[split_of[name]][name] = len(encoded)
            if not any(written.values()):
                raise ValueError(f"no readable audio in {self.path!r}: all {len(names)} files were skipped")
            for s in SPLITS:
                if not written[s]:
                    raise ValueError(
                        f"the {s} split of {self.path!r} has no readable audio: none of its {len(assignment[s])} "
                        f"file(s) could be read"
                    )
            for s in SPLITS:
                partials[s].rename(folder / f"{s}.bin")
        finally:
            for partial in partials.values():
                partial.unlink(missing_ok=True)
        meta = {
            "path": self.path,
            "sample_rate": self.sample_rate,
            "encoding": self.encoding,
            "n_bytes": {s: sum(written[s].values()) for s in SPLITS},
            "files": written,
            "skipped": skipped,
        }
        (folder / "meta.json.part").write_text(json.dumps(meta, indent=1))
        (folder / "meta.json.part").rename(folder / "meta.json")
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
