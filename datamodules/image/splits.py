"""The train / val / test images of the cached uint8 (N, seq_len) array: which rows each split gets
(``split_indices``) and a Dataset over them (``ImageRows``)."""

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import split_bounds


class ImageRows(Dataset):
    """Rows ``indices`` of ``images``, a uint8 (N, seq_len) memory map; item i is uint8 (seq_len,)."""

    def __init__(self, images: np.memmap, indices: np.ndarray) -> None:
        self.images = images
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        """-> uint8 (seq_len,), the bytes of image ``indices[index]``."""
        return torch.from_numpy(np.array(self.images[self.indices[index]]))

    # Worker processes started by spawn or forkserver reopen the map instead of receiving a copy of it.
    def __getstate__(self) -> dict[str, Any]:
        return {"file": self.images.filename, "shape": self.images.shape, "indices": self.indices}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.images = np.memmap(state["file"], dtype=np.uint8, mode="r", shape=state["shape"])
        self.indices = state["indices"]


def split_indices(n: int, split: tuple[float, float, float], order: np.ndarray) -> list[np.ndarray]:
    """The train / val / test image indices: consecutive runs of ``order`` (a permutation of range(n))
    of floor-rounded sizes, each split with a positive fraction getting at least one image (taken from
    train). Each is sorted, so evaluation reads the source in order."""
    bounds = split_bounds(n, split)
    counts = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    for i in (1, 2):
        if split[i] > 0 and counts[i] == 0 and counts[0] > 1:
            counts[0], counts[i] = counts[0] - 1, 1
    ends = np.cumsum(counts)
    return [np.sort(order[end - count : end]) for count, end in zip(counts, ends)]

