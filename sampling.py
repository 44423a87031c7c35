"""Sampling: prompts -> samples -> files or TensorBoard, for ``cli.py generate`` and the sample callback.

This module owns what both need: the checks of the sampling options (``check_sample_options``,
``check_generate_options``), the prompts (the first part of validation sequences, or a file encoded
by the DataModule), the model to sample from under the Trainer's strategy (``sampling_model``), the
generation on the Trainer's device and under its precision (``generate_samples``), and the samples
decoded to their medium (``ByteDataModule.decode`` and ``save``): files (``write_files``) or
TensorBoard events (``write_tensorboard``): ``add_text`` (indented as a code block so whitespace
survives), ``add_image`` (a grid: each original beside its completion) or ``add_audio`` (at the data's
sample rate). ``generate`` is the whole ``generate`` subcommand: its signature and docstring are the
subcommand's options and help.

When to sample during training, and which logger to write to, is the callback's
(``callbacks/samples.py``); parsing the command line is ``cli.py``'s. This module imports neither.
"""

from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
import torchvision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from datamodules.base import ByteDataModule
from megabyte import MegaByteLM
from megabyte import generation
from megabyte.generation import check_sampling
from megabyte.model import build_model

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def check_sample_options(sample_len: int | None, prompt_fraction: float) -> None:
    """Raise ValueError naming ``sample_len`` or ``prompt_fraction`` out of range."""
    if sample_len is not None and sample_len < 1:
        raise ValueError(f"sample_len must be >= 1 or None (data.seq_len), got {sample_len}")
    if not 0 <= prompt_fraction < 1:
        raise ValueError(f"prompt_fraction must be in [0, 1), got {prompt_fraction}")


def check_generate_options(model: MegaByteLM, datamodule: ByteDataModule, sample_len: int | None,
                           prompt_fraction: float, temperature: float, top_k: int | None,
                           top_p: float | None) -> int:  # fmt: skip
    """Raise ValueError naming a ``generate`` option out of range; -> the sample length.

    The CLI calls it with the options its signature names, before ``generate``, so that a refused
    option is the parser's error: its parameters must keep the names of ``generate``'s."""
    check_sample_options(sample_len, prompt_fraction)
    check_sampling(temperature, top_k, top_p)
    sample_len = datamodule.seq_len if sample_len is None else sample_len
    if sample_len > model.config.max_seq_len:
        raise ValueError(f"sample_len must be in 1..{model.config.max_seq_len} (the model's max_seq_len)")
    return sample_len


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


def file_prompts(
    datamodule: ByteDataModule, prompt_file: str, n: int, sample_len: int, prompt_fraction: float
) -> torch.Tensor:
    """``prompt_file`` encoded by the DataModule, once for each of ``n`` samples -> LongTensor (n, L).

    A file of at least ``sample_len`` bytes leaves nothing to generate: it is cut to
    ``prompt_fraction`` of ``sample_len`` (``ByteDataModule.cut_prompt``), with a warning."""
    prompt = datamodule.encode_file(prompt_file).long()
    if len(prompt) >= sample_len:  # e.g. a whole image: the model completes its second part
        n_bytes, prompt = len(prompt), datamodule.cut_prompt(prompt, int(prompt_fraction * sample_len))
        rank_zero_warn(
            f"{prompt_file} gives {n_bytes} bytes, at least sample_len ({sample_len}): prompting with "
            f"{len(prompt)} of them (--prompt_fraction of --sample_len)"
        )
    return prompt.expand(n, -1)


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
    ``compile``: compiled decoding steps (``megabyte.generate``)."""
    device = trainer.strategy.root_device
    generator = torch.Generator(device=device).manual_seed(seed)
    with trainer.precision_plugin.forward_context():
        new_bytes = sample_len - prompts.shape[1]
        prompts = prompts.to(device)
        return generation.generate(model, prompts, new_bytes, temperature, top_k, top_p, generator, compile=compile).cpu()


def write_files(
    datamodule: ByteDataModule, folder: Path, samples: torch.Tensor, originals: torch.Tensor | None
) -> list[Path]:
    """Samples (LongTensor (B, L)) as ``folder/sample_{i}`` and the validation sequences they continue,
    if any, as ``folder/original_{i}``, in files of the medium (``ByteDataModule.save``) -> the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [datamodule.save(sample, folder / f"sample_{i}") for i, sample in enumerate(samples)]
    if originals is not None:
        written += [datamodule.save(original, folder / f"original_{i}") for i, original in enumerate(originals)]
    return written


def as_code_block(text: str) -> str:
    """Markdown code block by indentation: whitespace and backticks survive TensorBoard's renderer."""
    return "\n".join("    " + line for line in text.split("\n"))


def write_tensorboard(
    writer: "SummaryWriter",
    datamodule: ByteDataModule,
    prompts: torch.Tensor,
    originals: torch.Tensor,
    samples: torch.Tensor,
    step: int,
) -> None:
    """Samples (LongTensor (B, L)) of ``prompts`` (B, n), continuing ``originals`` (B, L), as TensorBoard
    events of the data's medium at ``step``: images as one grid (each original beside its completion),
    audio at the data's sample rate, text as prompt and continuation in code blocks."""
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


def checkpoint_run(ckpt_path: str) -> Path | None:
    """The run folder that ``fit`` wrote ``ckpt_path`` into (``<save_dir>/<name>/<version>/checkpoints/X.ckpt``
    -> ``<save_dir>/<name>/<version>``); None for a checkpoint outside one."""
    folder = Path(ckpt_path).parent
    return folder.parent if folder.name == "checkpoints" and folder.parent.name else None


def generate(
    trainer: L.Trainer,
    model: MegaByteLM,
    datamodule: ByteDataModule,
    ckpt_path: str,
    output_dir: str | None = None,
    n_samples: int = 4,
    prompt_file: str | None = None,
    sample_len: int | None = None,
    prompt_fraction: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    compile: bool = False,
) -> list[Path]:
    """Generate samples from a checkpoint into files of the data's medium (.txt, .png or .wav).

    ``trainer``, ``model`` and ``datamodule`` are the CLI's (the Trainer gives the device and the
    precision); the other arguments are the options of ``cli.py generate``.

    Args:
        ckpt_path: The checkpoint to sample from; it also gives the model (and, unless
            configured, the data).
        output_dir: Folder for ``sample_{i}`` and, with validation prompts, ``original_{i}``; default
            ``samples/`` in the checkpoint's run folder (``logs/<name>/version_<n>/samples``), or in the
            current folder for a checkpoint outside a run folder.
        n_samples: Number of samples.
        prompt_file: Prompt with this file, encoded by the DataModule (text: its bytes; images and
            audio: converted like the training data). A file that fills ``sample_len`` is cut to
            ``prompt_fraction`` of it: an image keeps its first bytes (the model completes the rest),
            text and audio their last (the sample continues the end of the file). By default every
            sample continues the first ``prompt_fraction`` of a validation sequence.
        sample_len: Bytes per sample, prompt included; default ``data.seq_len`` (the whole image).
        prompt_fraction: Share of a sample given as the prompt (validation sequences, long prompt files).
        temperature: Sampling temperature; 0 is greedy.
        top_k: Sample among the k most likely bytes only.
        top_p: Sample from the smallest set of bytes whose probability reaches top_p.
        seed: Seed of the sampling.
        compile: Compile the decoding steps (``torch.compile``): about a minute at the start,
            then about 1.5x the bytes/s on a GPU; pays for long samples.
    """
    sample_len = check_generate_options(model, datamodule, sample_len, prompt_fraction, temperature, top_k, top_p)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    originals = None
    if prompt_file is not None:
        prompts = file_prompts(datamodule, prompt_file, n_samples, sample_len, prompt_fraction)
    else:
        datamodule.prepare_data()
        datamodule.setup("validate")
        prompts, originals, sample_len = validation_prompts(datamodule, n_samples, sample_len, prompt_fraction)
    model.to(trainer.strategy.root_device)
    samples = generate_samples(trainer, model.model, prompts, sample_len, seed, temperature, top_k, top_p, compile)
    run = checkpoint_run(ckpt_path)
    folder = Path(output_dir) if output_dir is not None else run / "samples" if run else Path("samples")
    written = write_files(datamodule, folder, samples, originals)
    rank_zero_info(f"{len(samples)} samples of {sample_len} bytes ({prompts.shape[1]} of prompt) in {folder}")
    return written
