"""MegaByteLM: the LightningModule around either architecture. A thin adapter: loss, metrics,
optimizer and schedule. The model itself lives in ``megabyte/model.py``."""

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from jsonargparse import set_parsing_settings
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric

from megabyte.compilation import inductor_options
from megabyte.model import (
    VOCAB_SIZE, ByteTransformer, ByteTransformerConfig, MegaByte, MegaByteConfig, ModelConfig, Transformer, build_model,
)  # fmt: skip
from megabyte.parallelize import parallelize

# The modes of torch.compile without CUDA graphs, for sharded models (FSDP gathers each block's weights
# into new memory every step, which a CUDA graph would have to record again) and for gradient
# accumulation (a backward graph's replay overwrites the gradients the previous micro-batch left in
# ``.grad``, its own output: pytorch/pytorch#169545, seen on an H100 with torch 2.11).
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}

# Let YAML choose the architecture with ``class_path: megabyte.MegaByteConfig`` or
# ``megabyte.ByteTransformerConfig``, and show the config fields' docstrings as CLI help. Set here
# (not only in cli.py) because Lightning re-parses a checkpoint's hyperparameters with jsonargparse
# in ``load_from_checkpoint``.
set_parsing_settings(subclasses_enabled=[ModelConfig], docstring_parse_attribute_docstrings=True)


def apply_memory_options(
    model: nn.Module, activation_checkpointing: Sequence[str] = (), local_chunk_patches: int | None = None
) -> nn.Module:
    """Trade compute for activation memory, from outside the model; neither option changes a parameter
    or an output (beyond float rounding), so a checkpoint trains, resumes and evaluates with or without them.

    activation_checkpointing: the Transformer stacks (attribute names: ``global_model`` and
        ``local_model`` of MegaByte, ``transformer`` of the ByteTransformer) whose blocks keep only their
        input in training and are recomputed in the backward pass (about a third more compute in them).
    local_chunk_patches: MegaByte runs its local model over at most this many patches at a time (and,
        when ``local_model`` is checkpointed, recomputes each chunk as a whole): None runs all B*K at once.
    """
    stacks = {name for name, module in model.named_children() if isinstance(module, Transformer)}
    unknown = sorted(set(activation_checkpointing) - stacks)
    if unknown:
        raise ValueError(
            f"activation_checkpointing names {unknown}, not a stack of {type(model).__name__}: "
            f"choose among {sorted(stacks)}"
        )
    if local_chunk_patches is not None:
        if not isinstance(model, MegaByte):
            raise ValueError(f"local_chunk_patches chunks MegaByte's local model; {type(model).__name__} has none: use null")
        if isinstance(local_chunk_patches, bool) or not isinstance(local_chunk_patches, int) or local_chunk_patches < 1:
            raise ValueError(f"local_chunk_patches must be a positive integer or null, got {local_chunk_patches!r}")
    for name in stacks:
        getattr(model, name).activation_checkpointing = name in activation_checkpointing
    if isinstance(model, MegaByte):
        model.local_chunk_patches = local_chunk_patches
    return model


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}``: plain data, safe in a checkpoint."""
    cls = type(config)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of ``config_to_dict``; only ModelConfig subclasses are accepted."""
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, ModelConfig)):
        raise TypeError(f"{data['class_path']} is not a model config")
    return cls(**data.get("init_args", {}))


def bits_per_byte(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """logits float (B, T, 256), x long (B, T) -> bits float32 (B, T) spent on every byte."""
    nats = F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), x.reshape(-1), reduction="none")
    return nats.view_as(x) / math.log(2)


def strided_bits(bits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The paper's strided inference: bits float32 (B, T) spent on every byte of x (B, T), from two passes.

    Within a patch the loss rises toward its last bytes. The second pass sees x offset by
    ``patch_size // 2`` bytes, so each byte sits once in the first half of a patch; every byte takes
    its bits from the pass where it does. ``bits_of``: LongTensor (B, T) -> bits (B, T) of one pass.
    Costs two passes; the second sees ``patch_size // 2`` bytes less context at the window's start.
    """
    B, T = x.shape
    half = patch_size // 2
    first = bits_of(x)  # byte t at patch position t % P
    if T <= half:  # no byte reaches the second half of its patch
        return first
    # Drop the first ``half`` bytes and zero-fill the end, so the shape (and a compiled graph) stays.
    second = bits_of(F.pad(x[:, half:], (0, half)))  # byte t at position (t - half) % P, read at t - half
    second = F.pad(second[:, : T - half], (half, 0))  # (B, T) realigned: second[:, t] is byte t's
    late = torch.arange(T, device=x.device) % patch_size >= half  # (T,) the second half of each patch
    return torch.where(late, second, first)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices of linear layers only; none on embeddings, pads, norms, biases."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"name": "decay", "params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


def lr_factor(step: int, warmup_steps: int, total_steps: float, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based):
    linear warm-up over ``warmup_steps``, then ``schedule`` decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or math.isinf(total_steps):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


class MegaByteLM(L.LightningModule):
    """Next-byte language modelling with MegaByte or the ByteTransformer baseline.

    Batches are ``(x, mask)``: x uint8 or long (B, T) bytes, mask bool (B, T), True where a byte
    counts. The loss is the mean cross-entropy in nats over every counted byte; bits per byte
    (bpb) = nats / ln 2. Validation and test bpb are exact over the split: total bits / total bytes.
    """

    def __init__(
        self,
        arch: ModelConfig,
        lr: float = 6e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 500,
        schedule: Literal["linear", "cosine", "constant"] = "linear",
        min_lr_ratio: float = 0.0,
        compile: bool | None = None,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "reduce-overhead",
        skip_nonfinite: bool = False,
        strided_eval: bool = False,
        activation_checkpointing: tuple[str, ...] = (),
        local_chunk_patches: int | None = None,
    ) -> None:
        """
        Args:
            arch: The architecture: ``megabyte.MegaByteConfig`` or ``megabyte.ByteTransformerConfig``.
            lr: Peak learning rate of AdamW.
            weight_decay: AdamW weight decay of linear-layer matrices (the paper's 0.1).
            betas: AdamW betas (the paper's 0.9, 0.98).
            warmup_steps: Optimizer steps of linear warm-up from 0 to ``lr`` (the paper's 500).
            schedule: Decay after warm-up, down to ``min_lr_ratio * lr`` at the Trainer's last step
                (``max_steps``, or ``max_epochs`` worth of steps). The paper's polynomial decay is linear.
            min_lr_ratio: Final learning rate as a fraction of ``lr``.
            compile: ``torch.compile`` the model (one graph, no breaks; sharded with FSDP2, one graph per
                transformer block) for training and evaluation; None compiles on a GPU and not on the
                CPU. Not under FSDPStrategy (FSDP1), whose default is then no compilation.
            compile_mode: ``torch.compile``'s mode. "reduce-overhead" replays the forward and backward
                passes as CUDA graphs: a step launches a few graphs instead of about a thousand kernels
                (config M on an H100: 1.78 M bytes/s against 1.35 M with "default").
            skip_nonfinite: Skip a training step whose loss is NaN or infinite (no update; a warning
                names it) instead of stopping (the FaultTolerance callback). Under several processes
                all skip the step where any has such a loss; with gradient accumulation the whole step
                is skipped. Reads the loss on the host every step: a synchronisation with the GPU.
            strided_eval: Validate, test and predict with the paper's strided inference (MegaByte only):
                two passes, the second offset by half a patch, each byte scored in the first half of a
                patch (``strided_bits``). Twice the cost of evaluation; training is unchanged. Can be
                switched on for a trained checkpoint: ``cli.py test --ckpt_path F --model.strided_eval true``.
            activation_checkpointing: Transformer stacks whose blocks are recomputed in the backward pass
                instead of keeping their activations: ``[global_model, local_model]`` or a part of it for
                MegaByte, ``[transformer]`` for the ByteTransformer. Costs about a third more compute in
                the stacks named; a run option, like ``local_chunk_patches``: a checkpoint trains, resumes
                and evaluates with or without it (``--ckpt_path F --model.activation_checkpointing [local_model]``).
            local_chunk_patches: Run MegaByte's local model over at most this many patches at a time (null:
                all B*K at once). With ``local_model`` checkpointed, each chunk is recomputed as a whole in
                the backward pass, so the local model keeps one chunk's activations: what lets T reach 1M
                bytes (configs/long/megabyte-1m.yaml). The same outputs as without.
        """
        super().__init__()
        if isinstance(arch, dict):  # from a checkpoint's hyperparameters
            arch = config_from_dict(arch)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas} (the paper's: 0.9, 0.98)")
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1; got lr={lr}, "
                f"weight_decay={weight_decay}, warmup_steps={warmup_steps}, min_lr_ratio={min_lr_ratio}"
            )
        if strided_eval and not isinstance(arch, MegaByteConfig):
            raise ValueError(f"strided_eval offsets MegaByte's patches; {type(arch).__name__} has none")
        self.save_hyperparameters()
        if isinstance(self.hparams["arch"], ModelConfig):  # keep checkpoints free of pickled objects
            self.hparams["arch"] = config_to_dict(arch)
        self.config = arch
        self.model = apply_memory_options(build_model(arch), activation_checkpointing, local_chunk_patches)
        self._bits_per_byte = bits_per_byte  # compiled with the model (configure_model)
        self._cuda_graphs = False  # whether the compiled model replays CUDA graphs (configure_model)
        self.val_bpb = MeanMetric().set_dtype(torch.float64)
        self.test_bpb = MeanMetric().set_dtype(torch.float64)

    def configure_model(self) -> None:
        """Compile and shard from outside the model (``megabyte.parallelize``). Under Lightning's
        ``ModelParallelStrategy`` the model is sharded with FSDP2 over the data-parallel processes, each
        transformer block a unit compiled on its own (without CUDA graphs); otherwise (one device, DDP)
        the whole model is compiled as one graph. ``nn.Module.compile`` keeps parameter names (and
        checkpoints) unchanged; generation runs the eager submodules."""
        if self._trainer is None:  # e.g. load_from_checkpoint: no Trainer, no compilation
            return
        strategy = self.trainer.strategy
        compile, mode, mesh = self.hparams.compile, self.hparams.compile_mode, None
        if isinstance(strategy, FSDPStrategy):  # FSDP1 wraps the model after this hook, around a compiled graph
            if compile:
                raise ValueError(
                    "model.compile under FSDPStrategy is not supported: shard with ModelParallelStrategy "
                    "(FSDP2, configs/distributed/fsdp.yaml), which compiles every block, or set model.compile false"
                )
            compile = False
        if compile is None:
            compile = strategy.root_device.type == "cuda"
        if isinstance(strategy, ModelParallelStrategy):
            if self.device_mesh["tensor_parallel"].size() > 1:
                raise ValueError(
                    "tensor parallelism is not implemented: give ModelParallelStrategy tensor_parallel_size 1 and "
                    "data_parallel_size auto (trainer.devices x trainer.num_nodes)"
                )
            mesh = self.device_mesh["data_parallel"]
        why = None
        if mesh is not None:
            why = "sharded"
        elif self.trainer.accumulate_grad_batches > 1:
            why = f"accumulate_grad_batches {self.trainer.accumulate_grad_batches}"
        if compile and mode in WITHOUT_CUDA_GRAPHS and why:
            rank_zero_info(f"{why}: compile_mode {mode!r} becomes {WITHOUT_CUDA_GRAPHS[mode]!r} (no CUDA graphs)")
            mode = WITHOUT_CUDA_GRAPHS[mode]
        self._cuda_graphs = compile and mode in WITHOUT_CUDA_GRAPHS  # its keys: the modes with CUDA graphs
        parallelize(self.model, inductor_options(mode) if compile else None, mesh)
        if compile and self._bits_per_byte is bits_per_byte:
            # The loss as one kernel a pass (float32 cast, log-softmax, the target's term) instead of about
            # ten eager ones over the (B, T, 256) logits; no CUDA graph, so its output is the caller's.
            self._bits_per_byte = torch.compile(bits_per_byte, fullgraph=True, dynamic=False)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture with one error naming the differing options
        (instead of a list of missing, unexpected and mis-shaped state_dict keys)."""
        ours = {k: v.shape for k, v in self.state_dict().items()}
        theirs = {k: v.shape for k, v in checkpoint.get("state_dict", {}).items()}
        if ours == theirs:
            return
        saved = checkpoint.get("hyper_parameters", {}).get("arch", {})
        saved_class, saved_args = saved.get("class_path", "?"), saved.get("init_args", {})
        current = config_to_dict(self.config)
        if saved_class.rpartition(".")[2] != type(self.config).__name__:  # megabyte.X and megabyte.model.X are one
            difference = f"arch.class_path {saved_class} (checkpoint) vs {current['class_path']} (configured)"
        else:
            difference = ", ".join(
                f"{k} {saved_args[k]} (checkpoint) vs {v} (configured)"
                for k, v in current["init_args"].items() if k in saved_args and saved_args[k] != v
            ) or f"parameters {sorted(set(ours) ^ set(theirs) or {k for k in ours if ours[k] != theirs.get(k)})[:5]}"
        raise ValueError(
            f"the checkpoint holds another architecture than the one configured: {difference}. "
            f"Build the model from the checkpoint (MegaByteLM.load_from_checkpoint, or the CLI with --ckpt_path) "
            f"or with the same values."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: LongTensor (B, T), values 0..255 -> logits (B, T, 256)."""
        return self.model(x)

    def _bits_of(self, x: torch.Tensor) -> torch.Tensor:
        """x: LongTensor (B, T) -> bits float32 (B, T), one pass of the model."""
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are free to reuse
        return self._bits_per_byte(self.model(x), x)

    def _bits(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = batch
        return self._bits_of(x.long()), mask

    def _eval_bits(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``_bits``, or with ``strided_eval`` the two passes of strided inference."""
        if not self.hparams.strided_eval:
            return self._bits(batch)
        x, mask = batch
        return strided_bits(self._bits_of, x.long(), self.config.patch_size), mask

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | dict[str, Any]:
        bits, mask = self._bits(batch)
        bpb = (bits * mask).sum() / mask.sum()
        loss = bpb * math.log(2)  # mean nats per byte
        if self.hparams.skip_nonfinite and self._any_nonfinite(loss):
            rank_zero_warn(
                f"skipped a training step with loss {loss.item()} (batch {batch_idx}, step {self.global_step}; "
                f"the loss of at least one process is not finite)"
            )
            # The backward pass still runs: under several processes each takes part in its collectives.
            # on_before_optimizer_step then drops the step's gradients; FaultTolerance ignores the loss.
            self._skip_step = True
            return {"loss": loss, "skipped": True}
        # Not on the progress bar: Lightning reads its metrics on the host after every batch, a
        # synchronisation with the GPU that cost config M 7 % of its speed on an H100 (RESULTS.md).
        self.log("train/loss", loss)
        self.log("train/bpb", bpb)
        return loss

    _skip_step = False
    """Whether a batch of the optimizer step under way had a non-finite loss (``skip_nonfinite``)."""

    def _any_nonfinite(self, loss: torch.Tensor) -> bool:
        """Whether the loss of this process or of any other is NaN or infinite. Every process takes part in
        each step's collectives (DDP's gradient all-reduce, FSDP's gathers), so all skip a step or none:
        the decision is reduced over the processes (no communication with one process)."""
        return self.trainer.strategy.reduce_boolean_decision(not torch.isfinite(loss), all=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """No update for a step with a non-finite loss in any of its batches (``skip_nonfinite``): without
        gradients AdamW leaves every parameter and its state as they are (no momentum, no weight decay)."""
        if self._skip_step:
            optimizer.zero_grad(set_to_none=True)
            self._skip_step = False

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_bpb, "val/bpb")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_bpb, "test/bpb")

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], metric: MeanMetric, name: str) -> None:
        bits, mask = self._eval_bits(batch)
        # Weighted mean over bytes: at the end, total bits / total bytes of the whole split.
        metric.update(bits.double(), mask.double())
        self.log(name, metric, on_step=False, on_epoch=True, prog_bar=True)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """-> {"bits": float (B, T) bits spent on each byte, "mask": bool (B, T)}."""
        bits, mask = self._eval_bits(batch)
        return {"bits": bits, "mask": mask}

    def _fused_optimizer(self) -> bool:
        # A fused AdamW on the GPU, except under fp16's gradient scaler, which it would unscale itself
        # before ``configure_gradient_clipping`` could clip true gradients.
        return self.device.type == "cuda" and str(self.trainer.precision) not in ("16-mixed", "16")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), fused=self._fused_optimizer()
        )
        total_steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, hp.warmup_steps, total_steps, hp.schedule, hp.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer | None, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradient norm on the device, without a host synchronisation (``clip_gradient_norm``).
        Done here because Lightning refuses to clip for fused optimizers, which are safe to clip when no
        gradient scaler is used (the fused optimizer is only chosen then), and by norm under FSDP, where
        the total norm is over the shards of all processes: FSDP1's ``clip_grad_norm_``, or under FSDP2
        (ModelParallelStrategy) the norm of the gradients' DTensors."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"only gradient_clip_algorithm 'norm' is supported, got {gradient_clip_algorithm!r}")
        if self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy):
            # Each process holds a shard of the gradients: the root FSDP module sums the squares of all.
            self._trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        clip_gradient_norm(self.model.parameters(), optimizer, gradient_clip_val)


def clip_gradient_norm(parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer | None, max_norm: float) -> None:
    """Scale the gradients of ``parameters`` down to a total norm of at most ``max_norm``, on the device.

    A fused Adam / AdamW divides the gradients itself: it is given the divisor (``grad_scale``, the
    attribute through which AMP's gradient scaler talks to it), which saves a pass over the gradients
    (RESULTS.md, session 7); for other optimizers ``clip_grads_with_norm_`` scales the gradients. Under
    FSDP2 the gradients are shards (DTensors): the norm is over all of them, reduced over the processes."""
    parameters = list(parameters)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if _divides_gradients(optimizer):
        # clip_grads_with_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); this is the same factor's inverse
        optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)
    else:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)


def _divides_gradients(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer`` is a fused Adam / AdamW, which divides the gradients by its ``grad_scale``."""
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))
