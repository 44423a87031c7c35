"""What ``cli.py predict`` gives: the bits the model spends on every byte of the predicted split.

``MegaByteLM.predict_step`` returns the bits of each window with a mask that counts every byte of the
split once; this callback keeps the counted bits in the split's order and writes them as one
float32 ``.npy`` array, element i for byte i of the split.
"""

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class BitsWriter(L.Callback):
    """Write the bits spent on every byte of the ``predict`` split to an ``.npy`` file."""

    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: The ``.npy`` file (float32, one value per byte of the split, in order); None is
                ``predict_bits.npy`` in the run's log folder.
        """
        super().__init__()
        self.path = path
        self.chunks: list[np.ndarray] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.chunks = []

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self.chunks.append(outputs["bits"][outputs["mask"]].float().cpu().numpy())

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:  # each process predicts other windows: no one file in the split's order
            rank_zero_warn("BitsWriter writes the bits of single-process predictions only; nothing written")
            return
        bits = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "predict_bits.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, bits)
        mean = f", {bits.mean():.4f} bits per byte" if len(bits) else ""
        rank_zero_info(f"bits of {len(bits):,} bytes{mean} written to {path}")
