"""Training throughput in TensorBoard: bytes per second and model FLOPs utilisation (MFU).

MFU = bytes/s x training FLOPs per byte (``megabyte.flops``, the count ``FlopCounterMode`` gives)
/ the accelerator's peak. The GPU is synchronised once every ``log_every_n_batches`` training batches, never
inside a step.
"""

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from megabyte.flops import training_flops_per_byte

# Dense bf16 / fp16 tensor-core peaks (FLOP/s). Lightning's table lists H200's sparse figure.
DENSE_PEAKS = {"H100": 989.4e12, "H200": 989.4e12}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one ``device`` at the Trainer's ``precision``; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    half = "bf16" in precision or "16-mixed" in precision or precision in ("16", "16-true")
    name = torch.cuda.get_device_name(device)
    for chip, peak in DENSE_PEAKS.items():
        if chip in name and half:
            return peak
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if half else torch.float32
    return get_available_flops(device, dtype)


class ThroughputCallback(L.Callback):
    """Log ``throughput/bytes_per_sec`` (all devices together), ``throughput/mfu`` and
    ``throughput/flops_per_byte`` every ``log_every_n_batches`` training batches."""

    def __init__(self, log_every_n_batches: int = 50, peak_flops_per_device: float | None = None) -> None:
        """
        Args:
            log_every_n_batches: Training batches per measurement window (the GPU is synchronised once a window).
            peak_flops_per_device: Peak FLOP/s of one device for MFU; default: known from the GPU's
                name and the Trainer's precision (989.4 TFLOP/s for bf16 on H100 / H200), none on CPU.
        """
        super().__init__()
        if log_every_n_batches < 1:
            raise ValueError(f"log_every_n_batches must be a positive integer, got {log_every_n_batches}")
        self.log_every_n_batches = log_every_n_batches
        self.peak_flops_per_device = peak_flops_per_device
        self._start: float | None = None
        self._bytes = 0
        self._steps = 0

    def _synchronize(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._synchronize(pl_module)
        self._start, self._bytes, self._steps = time.perf_counter(), 0, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        x = batch[0]
        self._bytes += x.numel()
        self._steps += 1
        if self._steps < self.log_every_n_batches or self._start is None:
            return
        self._synchronize(pl_module)
        now = time.perf_counter()
        bytes_per_sec = self._bytes * trainer.world_size / (now - self._start)
        flops_per_byte = training_flops_per_byte(pl_module.config, x.shape[1])
        metrics = {"throughput/bytes_per_sec": bytes_per_sec, "throughput/flops_per_byte": flops_per_byte}
        peak = self.peak_flops_per_device or peak_flops(pl_module.device, str(trainer.precision))
        if peak:
            metrics["throughput/mfu"] = bytes_per_sec * flops_per_byte / (peak * trainer.world_size)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._start, self._bytes, self._steps = now, 0, 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None  # validation time is not training time: start a new window after it

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self._synchronize(pl_module)
            self._start, self._bytes, self._steps = time.perf_counter(), 0, 0
