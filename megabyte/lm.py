"""MegaByteLM: the LightningModule around either architecture. A thin adapter: loss, metrics,
optimizer and schedule. The model lives in ``megabyte/model.py``; how it runs in ``megabyte/parallelize.py``."""

import math
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from megabyte.bits import byte_bits, strided_bits
from megabyte.config import MegaByteConfig, ModelConfig, config_from_dict, config_to_dict
from megabyte.model import build_model
from megabyte.optim import clip_gradient_norm, lr_factor, parameter_groups
from megabyte.parallelize import (
    check_run_options, inductor_options, parallelize, uses_cuda_graphs, without_cuda_graphs,
)  # fmt: skip

# Let YAML choose the architecture with ``class_path: megabyte.MegaByteConfig`` or
# ``megabyte.ByteTransformerConfig``, and show the config fields' docstrings as CLI help. Set here
# (not only in cli.py) because Lightning re-parses a checkpoint's hyperparameters with jsonargparse
# in ``load_from_checkpoint``.
set_parsing_settings(subclasses_enabled=[ModelConfig], docstring_parse_attribute_docstrings=True)


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
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("min_lr_ratio", min_lr_ratio)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
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
        self.model = build_model(arch)
        check_run_options(self.model, activation_checkpointing, local_chunk_patches)  # applied in configure_model
        self._byte_bits = byte_bits  # compiled with the model (configure_model)
        self._cuda_graphs = False  # whether the compiled model replays CUDA graphs (configure_model)
        self.val_bpb = MeanMetric().set_dtype(torch.float64)
        self.test_bpb = MeanMetric().set_dtype(torch.float64)

    def configure_model(self) -> None:
        """Apply how the model runs, from outside it (``megabyte.parallelize``): activation checkpointing,
        local chunks, compilation and sharding. Under Lightning's ``ModelParallelStrategy`` the model is
        sharded with FSDP2 over the data-parallel processes, each transformer block a unit compiled on its
        own (without CUDA graphs); otherwise (one device, DDP) the whole model is compiled as one graph. ``nn.Module.compile`` keeps parameter names (and
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
        if compile and uses_cuda_graphs(mode) and why:
            rank_zero_info(f"{why}: compile_mode {mode!r} becomes {without_cuda_graphs(mode)!r} (no CUDA graphs)")
            mode = without_cuda_graphs(mode)
        self._cuda_graphs = compile and uses_cuda_graphs(mode)
        hp = self.hparams
        parallelize(
            self.model, hp.activation_checkpointing, hp.local_chunk_patches, inductor_options(mode) if compile else None, mesh
        )
        if compile and self._byte_bits is byte_bits:
            # The loss as one kernel a pass (float32 cast, log-softmax, the target's term) instead of about
            # ten eager ones over the (B, T, 256) logits; no CUDA graph, so its output is the caller's.
            self._byte_bits = torch.compile(byte_bits, fullgraph=True, dynamic=False)

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

    def _one_pass_bits(self, x: torch.Tensor) -> torch.Tensor:
        """x: LongTensor (B, T) -> bits float32 (B, T), one pass of the model."""
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are free to reuse
        return self._byte_bits(self.model(x), x)

    def _training_bits(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """batch (x, mask) -> (bits float32 (B, T) of every byte, mask), one pass."""
        x, mask = batch
        return self._one_pass_bits(x.long()), mask

    def _evaluation_bits(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``_training_bits``, or with ``strided_eval`` the two passes of strided inference."""
        if not self.hparams.strided_eval:
            return self._training_bits(batch)
        x, mask = batch
        return strided_bits(self._one_pass_bits, x.long(), self.config.patch_size), mask

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | dict[str, Any]:
        bits, mask = self._training_bits(batch)
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
        # synchronisation with the GPU every step.
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
        bits, mask = self._evaluation_bits(batch)
        # Weighted mean over bytes: at the end, total bits / total bytes of the whole split.
        metric.update(bits.double(), mask.double())
        self.log(name, metric, on_step=False, on_epoch=True, prog_bar=True)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """-> {"bits": float (B, T) bits spent on each byte, "mask": bool (B, T)}."""
        bits, mask = self._evaluation_bits(batch)
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

