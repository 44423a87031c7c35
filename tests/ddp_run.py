"""Train a tiny MegaByte a few steps on the CPU, in one process or in several (DDP, FSDP2), and record
what tests/test_distributed.py compares.

``python -m tests.ddp_run CORPUS OUT_DIR`` (from the repository root, one command per process, each
with its ``LOCAL_RANK`` and ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK`` and ``WORLD_SIZE`` in the
environment, as torchrun or SLURM start them) runs, in one process group of 2 processes (gloo):

1. ``ddp``: DDP, batch 1 per process and 2 batches a step (gradient accumulation): 4 windows a step.
   Validation after steps 2 and 4, each followed by samples (rank zero alone), then a checkpoint
   (``ddp.ckpt``), ``test`` and ``predict`` (``ddp_bits.npy``).
2. ``fsdp``: FSDP2 (``ModelParallelStrategy``, ``MegaByteLM.configure_model`` makes every block a
   unit), batch 2 per process, the same validations and samples (the weights gathered to rank zero),
   checkpoint (``fsdp.ckpt``, full weights), test and predict (``fsdp_bits.npy``). With the fused
   AdamW a GPU takes (clipped through its ``grad_scale``, from the norm over the DTensor shards), both
   stacks' blocks recomputed in the backward pass and the local model run in chunks of 3 patches
   (``model.activation_checkpointing``, ``model.local_chunk_patches``).
3. ``skipped`` / ``stopped``: DDP where process 1 alone has a NaN loss at its second batch, with
   ``model.skip_nonfinite`` and with the FaultTolerance callback's stop.

Every run trains on the windows of one process with batch 4 (``run``, called by the test) and clips
the gradients to norm 1 (active at every step). Process r writes ``OUT_DIR/rank<r>.json``.
"""

import faulthandler
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule

from callbacks.fault_tolerance import FaultTolerance
from callbacks.predictions import BitsWriter
from callbacks.samples import SampleCallback
from datamodules import TextDataModule
from megabyte import MegaByteLM
from megabyte.transformer import Block
from tests.conftest import tiny_megabyte_config

SEQ_LEN, STEPS = 32, 4
SAMPLES = {"n_samples": 2, "sample_len": 16, "temperature": 1.0, "seed": 0}
HANG_AFTER_S = 150  # the whole job takes about 20 s on 2 cores: print every thread's stack and exit after this


def phase(name: str) -> None:
    """A line in this process's output (the test shows its end when a process fails or hangs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


class Record(L.Callback):
    def __init__(self) -> None:
        self.train: list[list[str]] = []  # per batch: each window's bytes, hex
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


class NanLoss(L.Callback):
    """NaN logits, hence a NaN loss, in process ``rank`` at its batch ``batch`` only."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            forward = pl_module.model.forward
            pl_module.model.forward = lambda x: forward(x) * float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        vars(pl_module.model).pop("forward", None)


def data_and_model(corpus: str, out_dir: str, batch_size: int, **model_args) -> tuple[TextDataModule, MegaByteLM]:
    L.seed_everything(0, verbose=False)
    data = TextDataModule(corpus, seq_len=SEQ_LEN, batch_size=batch_size, num_workers=0, cache_dir=f"{out_dir}/cache")
    arch = tiny_megabyte_config(max_seq_len=SEQ_LEN)
    return data, MegaByteLM(arch, lr=3e-3, warmup_steps=0, schedule="constant", **model_args)


def trainer(devices: int, strategy, max_steps: int, callbacks: list, accumulate: int = 1, logger=False,
            validate: bool = True) -> L.Trainer:  # fmt: skip
    """Validation after every 2 optimizer steps; gradients clipped to norm 1."""
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, accumulate_grad_batches=accumulate,
        val_check_interval=2 * accumulate, check_val_every_n_epoch=None, limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0, gradient_clip_val=1.0,
        callbacks=callbacks, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip


def run(corpus: str, out_dir: str, devices: int, batch_size: int, strategy="auto", accumulate: int = 1,
        steps: int = STEPS, samples: bool = False, fused: bool = False, **model_args,
        ) -> tuple[dict, L.Trainer, MegaByteLM, TextDataModule]:  # fmt: skip
    """Train ``steps`` steps of ``accumulate`` batches of ``batch_size`` windows per process, validating
    every 2 steps; -> (this process's record, the Trainer, the model, the data). ``fused``: the fused
    AdamW, as on a GPU (also on the CPU). ``model_args``: MegaByteLM's other options."""
    data, model = data_and_model(corpus, out_dir, batch_size, **model_args)
    if fused:
        model._fused_optimizer = lambda: True
    record = Record()
    callbacks = [record, BitsWriter(f"{out_dir}/bits.npy")]
    logger = False
    if samples:
        callbacks.append(SampleCallback(**SAMPLES))
        logger = TensorBoardLogger(out_dir, name="logs", version=0)
    fit = trainer(devices, strategy, steps, callbacks, accumulate, logger)
    fit.fit(model, data)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return {
        "rank": fit.global_rank, "world_size": fit.world_size, "train": record.train,
        "val_bytes": record.val_bytes, "val_bpb": record.val_bpb, "val_split": len(data.splits["val"]),
        "sharded": [isinstance(m, FSDPModule) for m in (model.model, *blocks)],
    }, fit, model, data  # fmt: skip


def distributed(corpus: str, out_dir: str) -> dict:
    """The runs of the module docstring in this process; -> its record."""
    record = {}
    fsdp = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    # FSDP2 with both stacks' blocks recomputed in the backward pass and the local model in chunks
    memory = {"activation_checkpointing": ("global_model", "local_model"), "local_chunk_patches": 3}
    for name, strategy, batch_size, accumulate in (("ddp", "ddp", 1, 2), ("fsdp", fsdp, 2, 1)):
        phase(f"{name}: fit, save, test, predict")
        out, fused, options = f"{out_dir}/{name}", name == "fsdp", memory if name == "fsdp" else {}
        record[name], fit, model, data = run(
            corpus, out, 2, batch_size, strategy, accumulate, samples=True, fused=fused, **options
        )  # fmt: skip
        record[name]["fused"] = fit.optimizers[0].defaults["fused"]
        fit.save_checkpoint(f"{out_dir}/{name}.ckpt")
        record[name]["test_bpb"] = fit.test(model, data, verbose=False)[0]["test/bpb"]
        fit.predict(model, data, return_predictions=False)  # BitsWriter: out/bits.npy

    phase("skipped: a NaN loss in process 1, model.skip_nonfinite")
    data, model = data_and_model(corpus, out_dir, 2, skip_nonfinite=True)
    skipped = trainer(2, "ddp", 3, [NanLoss(rank=1, batch=1)], validate=False)
    skipped.fit(model, data)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    record["skipped"] = {"global_step": skipped.global_step, "weights": weights.sum().item(),
                         "finite": bool(weights.isfinite().all())}  # fmt: skip

    phase("stopped: a NaN loss in process 1, FaultTolerance")
    data, model = data_and_model(corpus, out_dir, 2)
    nan_stops = [NanLoss(rank=1, batch=1), FaultTolerance(save_on_sigterm=False, check_every_n_batches=1)]
    stopped = trainer(2, "ddp", 3, nan_stops, validate=False)
    try:
        stopped.fit(model, data)
        record["stopped"] = None
    except FloatingPointError as error:
        record["stopped"] = str(error)
    Path(out_dir, f"rank{skipped.global_rank}.json").write_text(json.dumps(record))
    phase("done")
    return record


if __name__ == "__main__":
    faulthandler.dump_traceback_later(HANG_AFTER_S, exit=True)
    torch.set_num_threads(1)
    distributed(*sys.argv[1:])
