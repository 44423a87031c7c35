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

``codec`` holds waveform <-> bytes, ``sources`` the files of a path and how one becomes a waveform,
``splits`` which file goes to which split and ``datamodule`` the ``AudioDataModule`` that ties them to
a cache.
"""

from datamodules.audio.codec import (
    decode_bytes,
    encode_waveform,
    mulaw_to_waveform,
    pcm16_to_waveform,
    waveform_to_mulaw,
    waveform_to_pcm16,
)
from datamodules.audio.datamodule import AudioDataModule

__all__ = [
    "AudioDataModule",
    "decode_bytes",
    "encode_waveform",
    "mulaw_to_waveform",
    "pcm16_to_waveform",
    "waveform_to_mulaw",
    "waveform_to_pcm16",
]
