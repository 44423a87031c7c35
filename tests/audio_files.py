"""Tiny, valid audio files for tests (plain functions, importable from any test; no fixtures).

``write_wav_folder`` names its files like the Free Spoken Digit Dataset,
``{digit}_{speaker}_{index}.wav``, and gives some of them an index 0-4, so FSDD's official test
pattern ``_[0-4]\\.wav$`` (the one in ``configs/audio/fsdd.yaml``) finds a test split in it. Every
config in ``configs/audio/`` trains on such a folder with ``--data.path=<folder> --data.seq_len=32``.
"""

import tarfile
from pathlib import Path

import numpy as np
import soundfile

SPEAKERS = ("george", "jackson", "lucas")
FSDD_TEST_PATTERN = r"_[0-4]\.wav$"


def sine(frequency: float, seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    """float32 (round(seconds * sample_rate),): ``amplitude * sin(2 pi frequency t)``, t in seconds."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def fsdd_name(i: int) -> str:
    """The name of the ``i``-th test file, 0 <= i < 150: ``{i % 10}_{speaker i % 3}_{3 i % 50}.wav``.

    Indices run 0, 3, 6, ... (mod 50): the first two files (indices 0 and 3) match ``_[0-4]\\.wav$``,
    the next ones (6, 9, ...) do not, up to file 17 (index 1).
    """
    if not 0 <= i < 50 * len(SPEAKERS):
        raise ValueError(f"only {50 * len(SPEAKERS)} distinct names, got i = {i}")
    return f"{i % 10}_{SPEAKERS[i % 3]}_{3 * i % 50}.wav"


def write_wav_folder(folder: Path, n: int = 12, sample_rate: int = 8000, seconds: float = 0.25) -> Path:
    """Write ``n`` mono 16-bit PCM WAVs of ``seconds`` each into ``folder`` (created), named by
    ``fsdd_name``; file ``i`` is a sine of 200 + 50 i Hz at amplitude 0.5. Returns ``folder``.

    With the defaults: 12 files of 2,000 samples (4,000 bytes as pcm16), 2 of them (indices 0 and 3)
    in FSDD's test split.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        soundfile.write(folder / fsdd_name(i), sine(200 + 50 * i, seconds, sample_rate), sample_rate, subtype="PCM_16")
    return folder


def write_tar(folder: Path, archive: Path, arcname: str = "fsdd/recordings") -> Path:
    """Pack the files of ``folder`` (sorted by name) into the tar ``archive`` under ``arcname/``, as
    in ``fsdd.tar``; a name ending in ``.gz`` gives a gzip-compressed tar. Returns ``archive``."""
    archive = Path(archive)
    with tarfile.open(archive, "w:gz" if archive.name.endswith(".gz") else "w") as tar:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                tar.add(f, arcname=f"{arcname}/{f.relative_to(folder).as_posix()}")
    return archive
