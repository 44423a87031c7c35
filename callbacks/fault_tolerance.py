"""Training that survives its interruptions: atomic checkpoint files, a checkpoint on SIGTERM (what
job schedulers send before they kill), and a stop at the first non-finite loss before its weights
reach a checkpoint.

Resume with ``python cli.py fit --config X --ckpt_path PATH`` (the DataModule's sampling state is in
the checkpoint too, so the data order, learning rate and optimizer state continue where they stopped).
``--ckpt_path last`` looks in the checkpoint folder of the run being started: it finds the interrupted
run's ``last.ckpt`` only when both write to the same folder, e.g. with a fixed
``--trainer.logger.init_args.version`` (TensorBoard otherwise starts a new ``version_N``).
"""

import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file next to the target, flushed to disk, then renamed over it: a
    kill at any moment leaves either the old checkpoint or the new one, never a truncated file.
    (Lightning's own save goes through a temporary file in ``/tmp``, which is a copy, not a rename,
    when the checkpoint folder is on another file system.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.part")
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)


class FaultTolerance(Callback):
    """Atomic checkpoints, ``last.ckpt`` on SIGTERM, and a stop on a non-finite training loss.

    Args:
        save_on_sigterm: On SIGTERM, write ``last.ckpt`` in the ModelCheckpoint's folder (the state
            after the last finished step) before the process exits.
        stop_on_nonfinite: Stop at a NaN or infinite training loss with an error naming the first such
            step and the last checkpoint written. The losses are checked on the device; the host
            reads the result every ``check_every_n_batches`` batches, before every validation and
            before every checkpoint is written, so weights after a non-finite loss are never saved
            and no training step waits for the host. (``model.skip_nonfinite`` skips such steps instead.)
            Under several processes the check is reduced over them: a non-finite loss in any process
            stops all of them (a process stopping alone would leave the others waiting for it).
        check_every_n_batches: Batches between two reads of the check on the host.
    """

    def __init__(self, save_on_sigterm: bool = True, stop_on_nonfinite: bool = True, check_every_n_batches: int = 50) -> None:
        if check_every_n_batches < 1:
            raise ValueError(f"check_every_n_batches must be a positive integer, got {check_every_n_batches}")
        self.save_on_sigterm = save_on_sigterm
        self.stop_on_nonfinite = stop_on_nonfinite
        self.check_every_n_batches = check_every_n_batches
        self._nonfinite = False
        self._first_bad: torch.Tensor | None = None  # 0-dim, the first step with a non-finite loss, or -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # leave any other CheckpointIO be
            strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Runs before ModelCheckpoint's hook (Lightning orders checkpoint callbacks last).
        if not self.stop_on_nonfinite or not isinstance(outputs, dict) or "loss" not in outputs:
            return
        if outputs.get("skipped"):  # a step that model.skip_nonfinite skips (the same in every process)
            return
        loss = outputs["loss"].detach()
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        # The step's optimizer update is done: global_step counts it. No host synchronisation here.
        step = torch.full_like(self._first_bad, trainer.global_step - 1)
        seen = torch.isfinite(loss) | (self._first_bad >= 0)
        self._first_bad = torch.where(seen, self._first_bad, step)
        if (batch_idx + 1) % self.check_every_n_batches == 0:
            self._check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._check(trainer)  # runs before the checkpoint is written: raising keeps the last good one

    def _check(self, trainer: L.Trainer) -> None:
        if self._first_bad is None or self._nonfinite:
            return
        first_bad = self._first_bad
        if trainer.world_size > 1:  # all processes stop together, at the first step any of them saw
            never = torch.iinfo(torch.long).max
            first_bad = trainer.strategy.reduce(torch.where(first_bad >= 0, first_bad, never), reduce_op="min")
            first_bad = torch.where(first_bad == never, -1, first_bad)
        step = int(first_bad)  # the one host synchronisation
        if step >= 0:
            self._nonfinite = True
            raise FloatingPointError(
                f"training loss is nan or inf at step {step} (epoch {trainer.current_epoch}); stopped before "
                f"saving weights after it. Last checkpoint: {last_checkpoint(trainer)}. Resume from it with a "
                f"lower model.lr or a gradient_clip_val, or set model.skip_nonfinite to skip such steps."
            )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (self.save_on_sigterm and isinstance(exception, SIGTERMException)) or self._nonfinite:
            return
        folder = checkpoint_folder(trainer)
        if folder is None:
            log.warning("SIGTERM: no ModelCheckpoint folder, no checkpoint written")
            return
        path = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        checkpoint = trainer._checkpoint_connector.dump_checkpoint()  # what trainer.save_checkpoint writes
        loops = checkpoint["loops"]["fit_loop"]
        if loops["epoch_loop.batch_progress"]["current"]["completed"] >= trainer.num_training_batches:
            # Lightning raises SIGTERM at an epoch's end after counting the epoch as completed but before
            # resetting its batch counts, and would resume with one batch too many in the next epoch.
            for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress", "epoch_loop.automatic_optimization.optim_progress"):
                zero_current_counts(loops[key])
            loops["epoch_loop.batch_progress"]["is_last_batch"] = False
        trainer.strategy.save_checkpoint(checkpoint, path)
        log.warning("SIGTERM at step %d: saved %s; resume with --ckpt_path %s", trainer.global_step, path, path)
        exception.code = 128 + signal.SIGTERM  # the shell's status for a SIGTERM; Lightning's would be 0


def checkpoint_folder(trainer: L.Trainer) -> Path | None:
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None:
        return None
    return Path(callback.dirpath)


def last_checkpoint(trainer: L.Trainer) -> str:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return path or "none written yet"


def zero_current_counts(progress: dict[str, Any]) -> None:
    """Zero every ``current`` count of a saved Lightning progress tracker (what ``reset_on_run`` does)."""
    for key, value in progress.items():
        if key == "current":
            progress[key] = {name: 0 for name in value}
        elif isinstance(value, dict):
            zero_current_counts(value)
