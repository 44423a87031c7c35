"""Train a tiny MegaByte a few steps and validate twice, on one process or under DDP on the CPU.

``python -m tests.ddp_run CORPUS OUT_DIR DEVICES BATCH_SIZE`` (from the repository root): with
DEVICES > 1 Lightning's ``ddp`` strategy (gloo) starts the other processes by running this command
again, unless they are started from outside, each with its ``LOCAL_RANK`` and ``MASTER_ADDR``,
``MASTER_PORT``, ``NODE_RANK`` and ``WORLD_SIZE`` in the environment, as torchrun or SLURM do. Every
process writes ``OUT_DIR/rank<r>.json``: the windows of each training batch it saw, the bytes each
validation counted and the val/bpb each validation gave (synced over the processes).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import TextDataModule
from megabyte import MegaByteLM
from tests.conftest import tiny_megabyte_config

SEQ_LEN, STEPS = 32, 4


class Record(L.Callback):
    def __init__(self) -> None:
        self.train: list[list[str]] = []  # per step: each window's bytes, hex
        self.val_bytes: list[int] = []  # per validation: bytes counted by this process
        self.val_bpb: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append([bytes(w.tolist()).hex() for w in batch[0]])

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_bytes.append(0)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_bytes[-1] += int(batch[1].sum())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val_bpb.append(pl_module.val_bpb.compute().item())  # total bits / total bytes, all processes


def run(corpus: str, out_dir: str, devices: int, batch_size: int) -> dict:
    """Train STEPS steps with ``batch_size`` windows per process, validating after steps 2 and 4;
    -> this process's record (also written to ``out_dir/rank<r>.json``)."""
    L.seed_everything(0, verbose=False)
    data = TextDataModule(corpus, seq_len=SEQ_LEN, batch_size=batch_size, num_workers=0, cache_dir=f"{out_dir}/cache")
    model = MegaByteLM(tiny_megabyte_config(max_seq_len=SEQ_LEN), lr=3e-3, warmup_steps=0)
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS,
        val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[record],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, data)
    result = {
        "rank": trainer.global_rank, "world_size": trainer.world_size, "train": record.train,
        "val_bytes": record.val_bytes, "val_bpb": record.val_bpb, "val_split": len(data.splits["val"]),
    }  # fmt: skip
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    corpus, out_dir, devices, batch_size = sys.argv[1:]
    torch.set_num_threads(1)
    run(corpus, out_dir, int(devices), int(batch_size))
