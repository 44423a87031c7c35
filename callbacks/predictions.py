"""What ``cli.py predict`` gives: the bits the model spends on every byte of the predicted split.

``MegaByteLM.predict_step`` returns the bits of each window with a mask that counts every byte of the
split once; this callback keeps the counted bits of each window under the window's index and writes
them in the split's order as one float32 ``.npy`` array, element i for byte i of the split. Under
several processes each predicts other windows (process r of R: windows r, r + R, ...); rank zero
gathers them all and writes the same file as one process.
"""

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class BitsWriter(BasePredictionWriter):
    """Write the bits spent on every byte of the ``predict`` split to an ``.npy`` file."""

    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: The ``.npy`` file (float32, one value per byte of the split, in order); None is
                ``predict_bits.npy`` in the run's log folder.
        """
        super().__init__(write_interval="batch")
        self.path = path
        self.windows: dict[int, np.ndarray] = {}
        """Window index in the split -> float32 (L,), the bits of its L counted bytes."""

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.windows = {}

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        """``batch_indices``: the indices of the batch's windows in the dataset (Lightning's)."""
        bits, mask = prediction["bits"].float().cpu().numpy(), prediction["mask"].cpu().numpy()
        for index, window_bits, window_mask in zip(batch_indices, bits, mask):
            self.windows[int(index)] = window_bits[window_mask]

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        windows = self.windows
        if trainer.world_size > 1:  # every process's windows to rank zero (padding windows count no byte)
            shares = [None] * trainer.world_size if trainer.is_global_zero else None
            torch.distributed.gather_object(windows, shares, dst=0)
            if not trainer.is_global_zero:
                return
            windows = {i: w for share in shares for i, w in share.items()}
        chunks = [windows[i] for i in sorted(windows)]
        bits = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predict_bits.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, bits)
        mean = f", {bits.mean():.4f} bits per byte" if len(bits) else ""
        rank_zero_info(f"bits of {len(bits):,} bytes{mean} written to {path}")
