"""Windows over a byte stream: random ones for training, consecutive ones for evaluation.

Every modality ends up as a 1-D uint8 array (usually a memory map); these datasets cut it
into model inputs. A batch is ``(x, mask)``: ``x`` uint8 (B, T) bytes and ``mask`` bool
(B, T), False on the padding that fills up a short last window.
"""

import numpy as np
import torch
from torch.utils.data import Dataset


class RandomWindows(Dataset):
    """Every window of ``seq_len`` bytes that fits in ``data`` and starts at a multiple of ``step``;
    window ``i`` starts at byte ``i * step``.

    Sample it with a seeded ``RandomSampler`` to get random, reproducible training windows. A
    ``step`` of 2 keeps 16-bit audio samples whole.
    """

    def __init__(self, data: np.ndarray, seq_len: int, step: int = 1) -> None:
        if len(data) < seq_len:
            raise ValueError(f"{len(data)} bytes hold no window of seq_len {seq_len}")
        if step < 1:
            raise ValueError(f"step must be a positive integer, got {step}")
        self.data = data
        self.seq_len = seq_len
        self.step = step

    def __len__(self) -> int:
        return (len(self.data) - self.seq_len) // self.step + 1

    def __getitem__(self, index: int) -> torch.Tensor:
        """-> uint8 (seq_len,), the bytes [index * step, index * step + seq_len)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.step
        return torch.from_numpy(np.array(self.data[start : start + self.seq_len]))


class EvalWindows(Dataset):
    """Consecutive windows ``[i * seq_len, (i + 1) * seq_len)`` that cover ``data`` exactly once.

    The last window is shorter when ``len(data)`` is not a multiple of ``seq_len``.
    """

    def __init__(self, data: np.ndarray, seq_len: int) -> None:
        if len(data) == 0:
            raise ValueError("cannot evaluate on an empty split")
        self.data = data
        self.seq_len = seq_len

    def __len__(self) -> int:
        return -(-len(self.data) // self.seq_len)  # ceil

    def __getitem__(self, index: int) -> torch.Tensor:
        """-> uint8 (L,), L = seq_len except possibly for the last window."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        return torch.from_numpy(np.array(self.data[start : start + self.seq_len]))


def pad_collate(windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack windows into ``(x, mask)``: x uint8 (B, T) zero-padded at the end, mask bool (B, T)."""
    T = max(len(w) for w in windows)
    x = torch.zeros(len(windows), T, dtype=torch.uint8)
    mask = torch.zeros(len(windows), T, dtype=torch.bool)
    for i, w in enumerate(windows):
        x[i, : len(w)] = w
        mask[i, : len(w)] = True
    return x, mask
