"""The audio files of a data path (a folder, or a tar archive read directly) and how one file's
bytes become a mono waveform at the configured sample rate (libsndfile, then torchaudio's resampler)."""

import contextlib
import gzip
import io
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from datamodules.base import check_exists, check_tar_end, listed_files


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
    check_exists(path)
    if path.is_dir():
        files = listed_files(path)
        if not files:
            raise ValueError(f"data folder {str(path)!r} contains no files")
        return files
    with reading_archive(path):
        is_tar = tarfile.is_tarfile(path)
    if not is_tar:
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
    with reading_archive(path):
        with tarfile.open(path) as tar:
            names = [member.name for member in tar.getmembers() if member.isfile()]
            offset = tar.offset
    check_tar_end(path, offset)
    if not names:
        raise ValueError(f"archive {str(path)!r} contains no files")
    return names


def read_files(path: Path, files: list[Path]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, raw bytes)`` of every file ``file_names`` names, in the same order."""
    if path.is_dir():
        for f in files:
            yield f.relative_to(path).as_posix(), f.read_bytes()
        return
    with reading_archive(path), tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


@contextlib.contextmanager
def reading_archive(path: Path) -> Iterator[None]:
    """Turn the errors of a damaged tar archive (cut short, corrupt) into a ValueError naming it."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ValueError(f"cannot read the archive {str(path)!r} ({error or type(error).__name__}): replace it with a whole one") from None
