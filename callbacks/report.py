"""What ``fit`` says after each validation: one line without a progress bar, and the best val bpb as
TensorBoard's ``hp_metric`` (the HPARAMS tab's column, which Lightning sets to -1)."""

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class ValidationReport(L.Callback):
    """After each validation of ``fit``: ``hp_metric`` (the HPARAMS tab's column) becomes the best
    ``monitor`` value so far, and without a progress bar one line says the step, the value and the best.

    The best is kept in checkpoints, so a resumed run goes on from it."""

    def __init__(self, monitor: str = "val/bpb") -> None:
        self.monitor = monitor
        self.best: float | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.best is None or value < self.best:
            self.best = value
        for logger in trainer.loggers:
            logger.log_metrics({"hp_metric": self.best}, step=trainer.global_step)
        if trainer.progress_bar_callback is None:
            rank_zero_info(f"step {trainer.global_step}: {self.monitor} {value:.4f} (best {self.best:.4f})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
