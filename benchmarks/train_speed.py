"""Training speed of a config through the product's own path (LightningCLI, DataModule, Trainer).

    python benchmarks/train_speed.py --config configs/bench/config-m.yaml --json out.json [CLI overrides]

Trains ``--warmup`` batches (compilation, cuDNN autotuning, allocator warm-up), then times ``--steps``
batches with the device synchronised at both ends, and prints one table row: bytes/s, MFU (the
analytic FLOPs per byte of ``megabyte.flops``, which equal FlopCounterMode's), peak memory, batch,
T. Extra arguments go to the CLI unchanged (e.g. ``--data.path FILE --model.compile false``).
Validation and sampling are off; logs and a checkpoint go to a temporary folder.

Under several processes (``--config configs/distributed/ddp.yaml`` or ``fsdp.yaml``, which Lightning
starts by running this script again in each), bytes/s counts every process's bytes, and the first
process prints and writes the row. Every row also gives the training loss of each step (averaged over
the processes: with batch B on each of R processes, the loss of a batch of R x B, the same windows as one
process with batch R x B) and the memory one process holds for parameters, their gradients and the
optimizer's state (its shards under FSDP).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from callbacks.throughput import peak_flops
from cli import main
from megabyte.attention import BACKENDS
from megabyte.flops import training_flops_per_byte
from megabyte.transformer import CausalSelfAttention


class SpeedProbe(L.Callback):
    """Times the training batches after the first ``warmup`` ones."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.last = warmup, warmup + steps - 1
        self.bytes = 0
        self.start = self.end = 0.0
        self.losses: list[torch.Tensor] = []  # on the device: reading them would synchronise every step
        self.state_bytes: dict[str, int] = {}

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self._sync(pl_module)  # peak memory covers the warm-up too: CUDA graphs allocate when captured
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach().float())
        if batch_idx == 0:  # the optimizer has taken its first step: its state exists
            self.state_bytes = state_bytes(pl_module, trainer.optimizers[0])
        if batch_idx >= self.warmup:
            self.bytes += batch[0].numel()
        if batch_idx == self.last:  # the only synchronisation inside the timed batches
            self._sync(pl_module)
            self.end = time.perf_counter()


    def on_train_end(self, trainer, pl_module) -> None:
        """Every process's loss of each step, averaged (a collective: every process calls it)."""
        losses = torch.stack(self.losses) if self.losses else torch.zeros(0, device=pl_module.device)
        self.losses = trainer.strategy.reduce(losses, reduce_op="mean").tolist()


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds of ``tensor``: its shard for an FSDP2 DTensor."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def state_bytes(pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this process."""
    params = list(pl_module.model.parameters())
    optimizer_state = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {
        "parameters": sum(local_bytes(p) for p in params),
        "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer_state": sum(local_bytes(v) for v in optimizer_state),
    }


def measure(
    config: str, overrides: list[str], warmup: int = 10, steps: int = 30, short_attention: str = "auto"
) -> dict[str, Any]:
    """Train ``warmup + steps`` batches of ``config`` with the ``short_attention`` backend; return the
    measured figures."""
    with tempfile.TemporaryDirectory() as tmp:
        cli = main(
            [
                f"--config={config}", *overrides, f"--trainer.max_steps={warmup + steps}", "--trainer.max_time=null",
                "--trainer.limit_val_batches=0", f"--trainer.logger.init_args.save_dir={tmp}", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp}",
                "--trainer.accumulate_grad_batches=1", "--samples.every_n_validations=0",
            ],
            run=False,
        )  # fmt: skip
        use_short_attention(cli.model.model, short_attention)
        probe = SpeedProbe(warmup, steps)
        cli.trainer.callbacks.append(probe)
        wall = time.perf_counter()
        cli.trainer.fit(cli.model, cli.datamodule)
        wall = time.perf_counter() - wall
    trainer = cli.trainer
    if trainer.global_rank != 0:
        return None
    device = trainer.strategy.root_device  # the model itself is back on the CPU after fit
    seconds = probe.end - probe.start
    bytes_per_sec = probe.bytes * trainer.world_size / seconds  # every process trains on as many bytes
    seq_len = cli.datamodule.seq_len
    flops_per_byte = training_flops_per_byte(cli.model.config, seq_len)
    peak = peak_flops(device, str(cli.trainer.precision))
    return {
        "config": config,
        "overrides": overrides,
        "model": type(cli.model.model).__name__,
        "parameters": sum(p.numel() for p in cli.model.model.parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processes": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "precision": str(cli.trainer.precision),
        "compile": bool(getattr(cli.model.model, "_compiled_call_impl", None)),
        "batch": cli.datamodule.batch_size,
        "seq_len": seq_len,
        "timed_batches": steps,
        "seconds": seconds,
        "wall_seconds_with_warmup": wall,
        "bytes_per_sec": bytes_per_sec,
        "flops_per_byte": flops_per_byte,
        "mfu": bytes_per_sec * flops_per_byte / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": float(cli.trainer.callback_metrics["train/loss"]),
        "losses": probe.losses,
        "state_gib": {k: v / 2**30 for k, v in probe.state_bytes.items()},
    }


def use_short_attention(model: torch.nn.Module, backend: str) -> None:
    """Which attention the short sequences (the local model's patches) take, for before/after rows:
    "auto" (on a GPU without attention dropout the Triton kernel), "kernel", "packed" (SDPA over packed
    sequences, the path with attention dropout) or "written-out" (the CPU's matmuls)."""
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.short_attention = backend


def table_row(r: dict[str, Any]) -> str:
    state = r["state_gib"]
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
    memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
    path = r.get("short_attention", "auto")
    variant = "" if path in ("auto", "kernel") else f" (short attention: {path})"
    return (
        f"| {r['model']} | {Path(r['config']).name} {' '.join(r['overrides'])}{variant} "
        f"| {r['bytes_per_sec']:,.0f} | {mfu} "
        f"| {r['flops_per_byte'] / 1e6:,.1f} M | {memory} | {state['parameters'] + state['optimizer_state']:.2f} "
        f"| {r['processes']} x {r['batch']} | {r['seq_len']} | {r['compile']} |"
    )


HEADER = (
    "| model | config | bytes/s | MFU | FLOPs/byte | peak GiB | params + optimizer GiB | processes x batch | T | compiled |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def cli_main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first")
    parser.add_argument("--steps", type=int, default=30, help="timed batches")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    parser.add_argument("--short_attention", choices=BACKENDS, default="auto", help=use_short_attention.__doc__)
    args, overrides = parser.parse_known_args()
    result = measure(args.config, overrides, args.warmup, args.steps, args.short_attention)
    if result is None:  # not the first process
        return
    result["short_attention"] = args.short_attention
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(HEADER)
    print(table_row(result))


if __name__ == "__main__":
    cli_main()
