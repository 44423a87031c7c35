"""Samples in TensorBoard during training, each in its own medium: text as text, images as images,
audio as audio.

Every ``every_n_validations`` validation runs, the model continues the first part of a few
validation sequences, and the samples go to the Trainer's TensorBoard logger. What is sampled and how
it is shown (prompts, generation, decoding to the medium) is ``sampling.py``'s; this callback decides
when, and in which process.

Under several processes rank zero samples and logs. Where each process holds a shard of the weights
(FSDP), all of them first gather the weights into an unsharded copy on rank zero (``sampling_model``).
"""

import logging

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.base import ByteDataModule
from megabyte.generation import check_sampling
from sampling import check_sample_options, generate_samples, sampling_model, validation_prompts, write_tensorboard

log = logging.getLogger(__name__)


class SampleCallback(L.Callback):
    """Generate samples every ``every_n_validations`` validation runs and show them in TensorBoard.

    Rank zero samples and logs (every process takes part in gathering sharded weights first), under
    the Trainer's precision (e.g. bf16 autocast), with a fixed seed, so samples of successive
    validations differ only through the model.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        n_samples: int = 4,
        sample_len: int | None = 512,
        prompt_fraction: float = 0.5,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            every_n_validations: Sample after every N-th validation run (the sanity check excluded);
                0 turns sampling off.
            n_samples: Validation sequences to continue.
            sample_len: Bytes per sample, prompt included (at most ``data.seq_len``); None is
                ``data.seq_len``. Images always use the whole image.
            prompt_fraction: Share of each sample given as the prompt (0.5: the model completes
                the second half of each image).
            temperature: Sampling temperature; 0 is greedy.
            top_k: Sample among the k most likely bytes only.
            top_p: Sample from the smallest set of bytes whose probability reaches top_p.
            seed: Seed of the sampling.
        """
        super().__init__()
        if every_n_validations < 0 or n_samples < 1:
            raise ValueError(
                f"need every_n_validations >= 0 (0: off) and n_samples >= 1, got {every_n_validations} and {n_samples}"
            )
        # Checked now, not at the first validation: a bad value would end the run there, before its checkpoint.
        check_sample_options(sample_len, prompt_fraction)
        check_sampling(temperature, top_k, top_p)
        self.every_n_validations = every_n_validations
        self.n_samples = n_samples
        self.sample_len = sample_len
        self.prompt_fraction = prompt_fraction
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.seed = seed
        self.validations = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_validations == 0:
            return
        self.validations += 1
        if self.validations % self.every_n_validations != 0:
            return
        if not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers) or not isinstance(
            trainer.datamodule, ByteDataModule
        ):  # the same in every process: none gathers weights
            if trainer.is_global_zero:
                log.warning("SampleCallback needs a TensorBoardLogger and a ByteDataModule; no samples logged")
            return
        model = sampling_model(trainer, pl_module)  # collective under FSDP
        if model is not None:
            self.log_samples(trainer, model)

    def log_samples(self, trainer: L.Trainer, model: torch.nn.Module) -> None:
        """Sample from ``model`` (a MegaByte or ByteTransformer) and write the samples to TensorBoard."""
        writer = next(lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger))
        datamodule = trainer.datamodule
        sample_len = datamodule.seq_len if datamodule.media == "image" else self.sample_len
        prompts, originals, sample_len = validation_prompts(datamodule, self.n_samples, sample_len, self.prompt_fraction)
        samples = generate_samples(trainer, model, prompts, sample_len, self.seed, **self.sampling)
        write_tensorboard(writer, datamodule, prompts, originals, samples, trainer.global_step)
