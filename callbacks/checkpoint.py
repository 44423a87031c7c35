"""The CLI's checkpoints: Lightning's ModelCheckpoint, with ``last.ckpt`` always the latest state, and the
only one of its name in its folder."""

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``save_last=True`` writing ``last.ckpt`` at every checkpointing
    point (each validation, or each epoch end where checkpoints are saved then), also when it keeps no
    new top-k checkpoint, and at the end of training.

    Since Lightning 2.6, ``last.ckpt`` is written only at a step where a top-k checkpoint is saved. With
    ``save_top_k: 1`` on ``val/bpb`` (the CLI's default), a validation that did not improve left
    ``last.ckpt`` at the best step: resuming from it repeated the steps since, and testing it scored
    the best model, not the last.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_missed(trainer, due)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missed(trainer, due)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # Steps after the last validation (max_steps not a multiple of val_check_interval, max_time):
        # without this, last.ckpt would miss them.
        self._save_last_if_missed(trainer, due=not trainer.fast_dev_run)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        # One last.ckpt a folder: a run writes into a folder that holds checkpoints only when it resumes from
        # one of them (cli.py refuses the others), and then its last.ckpt is the one to replace. Lightning's
        # version counter would write last-v1.ckpt beside it, and --ckpt_path last or .../last.ckpt would
        # then read a stale model.
        if self.save_last is True:
            plain = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
            if self.file_exists(plain, trainer):
                self.last_model_path = plain
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_if_missed(self, trainer: L.Trainer, due: bool) -> None:
        # save_last="link" keeps Lightning's meaning: a link to the latest top-k checkpoint.
        if due and self.save_last is True and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
