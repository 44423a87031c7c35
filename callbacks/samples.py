"""Samples in TensorBoard, each in its own medium: text as text, images as images, audio as audio.

Every ``every_n_validations`` validation runs, the model continues the first part of a few
validation sequences and the DataModule decodes the results (``ByteDataModule.decode``):
``add_text`` (indented as a code block so whitespace survives), ``add_image`` (a grid: each
original beside its completion) or ``add_audio`` (at the data's sample rate).

Under several processes rank zero samples and logs. Where each process holds a shard of the weights
(FSDP), all of them first gather the weights into an unsharded copy on rank zero (``sampling_model``).
"""

import logging

import lightning as L
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from datamodules.base import ByteDataModule
from megabyte.generation import check_sampling
from megabyte.model import build_model

log = logging.getLogger(__name__)


def check_sample_options(sample_len: int | None, prompt_fraction: float) -> None:
    if sample_len is not None and sample_len < 1:
        raise ValueError(f"sample_len must be >= 1 or None (data.seq_len), got {sample_len}")
    if not 0 <= prompt_fraction < 1:
        raise ValueError(f"prompt_fraction must be in [0, 1), got {prompt_fraction}")


def validation_prompts(
    datamodule: ByteDataModule, n: int, sample_len: int | None, prompt_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompts from ``n`` validation sequences spread over the split.

    Returns (prompts LongTensor (B, prompt_len), originals LongTensor (B, sample_len), sample_len),
    B <= n: sequences shorter than ``sample_len`` (a short last window) are left out.
    ``sample_len`` None means the DataModule's ``seq_len``; a whole image for images.
    """
    check_sample_options(sample_len, prompt_fraction)
    sample_len = datamodule.seq_len if sample_len is None else min(sample_len, datamodule.seq_len)
    examples = [e[:sample_len] for e in datamodule.examples(n) if len(e) >= sample_len]
    if not examples:
        raise ValueError(f"no validation sequence holds sample_len {sample_len} bytes")
    originals = torch.stack(examples).long()  # (B, sample_len)
    prompt_len = int(prompt_fraction * sample_len)
    return originals[:, :prompt_len], originals, sample_len


def generate_samples(
    trainer: L.Trainer,
    model: torch.nn.Module,
    prompts: torch.Tensor,
    sample_len: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Continue ``prompts`` (LongTensor (B, n)) to ``sample_len`` bytes on the Trainer's device and
    under its precision (e.g. bf16 autocast), seeded -> LongTensor (B, sample_len) on the CPU.
    ``compile``: compiled decoding steps (``model.generate``)."""
    device = trainer.strategy.root_device
    generator = torch.Generator(device=device).manual_seed(seed)
    with trainer.precision_plugin.forward_context():
        new_bytes = sample_len - prompts.shape[1]
        return model.generate(prompts.to(device), new_bytes, temperature, top_k, top_p, generator, compile=compile).cpu()


def sampling_model(trainer: L.Trainer, pl_module: L.LightningModule) -> torch.nn.Module | None:
    """The model rank zero samples from; None in the other processes.

    Where every process holds all the weights (one device, DDP) it is the LightningModule's model and
    only rank zero runs it (DDP communicates in the training step only). Sharded (FSDP, FSDP2), every
    forward pass of a unit would gather its weights from all processes, so every process would have to
    run each decoding step in step: instead all of them take part once in gathering the full weights
    to rank zero (on its CPU), which samples from an unsharded copy on its device, alone. The call is
    then collective: every process must make it.
    """
    if not isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
        return pl_module.model if trainer.is_global_zero else None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the whole state on rank zero only
    state = get_model_state_dict(trainer.strategy.model, options=options)  # of the LightningModule: "model.*"
    if not trainer.is_global_zero:
        return None
    with torch.device("meta"):  # no initialisation: the weights are the gathered ones
        model = build_model(pl_module.config)
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(state, assign=True)
    return model.to(trainer.strategy.root_device)


def as_code_block(text: str) -> str:
    """Markdown code block by indentation: whitespace and backticks survive TensorBoard's renderer."""
    return "\n".join("    " + line for line in text.split("\n"))


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
        step = trainer.global_step
        if datamodule.media == "image":
            pairs = [image for original, sample in zip(originals, samples) for image in (original, sample)]
            grid = torchvision.utils.make_grid([datamodule.decode(s) for s in pairs], nrow=2, pad_value=128)
            writer.add_image("samples/image (original | completion)", grid, step, dataformats="CHW")
        elif datamodule.media == "audio":
            for i, sample in enumerate(samples):
                waveform, sample_rate = datamodule.decode(sample)
                writer.add_audio(f"samples/audio/{i}", waveform.reshape(1, -1), step, sample_rate=sample_rate)
        else:
            for i, sample in enumerate(samples):
                prompt_len = prompts.shape[1]
                text = (
                    f"**prompt**\n\n{as_code_block(datamodule.decode(sample[:prompt_len]))}\n\n"
                    f"**continuation**\n\n{as_code_block(datamodule.decode(sample[prompt_len:]))}"
                )
                writer.add_text(f"samples/text/{i}", text, step)
        writer.flush()
