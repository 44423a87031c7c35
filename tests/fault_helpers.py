"""Callbacks that interrupt a training run at a given step, for the fault-tolerance tests."""

import os
import signal

import lightning as L
import torch


class SignalAtStep(L.Callback):
    """Send ``signal_name`` (e.g. "SIGKILL", "SIGTERM") to this process before optimizer step ``step`` + 1."""

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class NanWeightsAtStep(L.Callback):
    """Make every weight NaN before optimizer step ``step`` + 1, so its loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))
