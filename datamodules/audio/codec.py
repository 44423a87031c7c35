"""Waveforms <-> bytes: 16-bit little-endian PCM (2 bytes a sample) or 8-bit mu-law (1 byte a
sample). Pure functions; any byte sequence decodes."""

import numpy as np
import torch
import torchaudio.functional as AF

from datamodules.base import Bytes, as_uint8

BYTES_PER_SAMPLE = {"pcm16": 2, "mulaw": 1}
MULAW_LEVELS = 256
PCM16_SCALE = 32768  # int16 value k <-> amplitude k / 32768, so -32768 is exactly -1.0


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
