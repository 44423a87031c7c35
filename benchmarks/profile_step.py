"""Where the time of one training step goes: the step without Lightning, eager and compiled, and the
CUDA kernels that cost the most (torch.profiler). A development tool for the speed work.

    python benchmarks/profile_step.py --config configs/bench/config-m.yaml [--steps 20] [--trace DIR]
        [--mode reduce-overhead] [--short_attention packed] [--eager]

Prints ms per step, bytes/s, MFU and peak memory, the 25 costliest kernels, and the GPU time per step
by kind of kernel (matrix products, attention, fused pointwise/norms, optimizer, other).
"""

import argparse
import functools
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cli import main
from megabyte.attention import BACKENDS
from megabyte.bits import byte_bits
from megabyte.flops import training_flops_per_byte
from megabyte.model import build_model
from megabyte.optim import clip_gradient_norm, parameter_groups
from megabyte.parallelize import inductor_options


BF16_AUTOCAST = functools.partial(torch.autocast, "cuda", torch.bfloat16)


def step_fn(model, optimizer, x, loss_fn=byte_bits, context=BF16_AUTOCAST):
    """One training step as MegaByteLM takes it: forward and loss (mean bits per byte) under ``context()``
    (bf16 autocast; a Trainer's ``precision_plugin.forward_context`` elsewhere), backward, clipping, AdamW.
    The logits are not kept through the backward pass (at T = 1M, 0.5 GiB in bf16)."""
    torch.compiler.cudagraph_mark_step_begin()
    with context():
        loss = loss_fn(model(x), x).mean()
    loss.backward()
    clip_gradient_norm(model.parameters(), optimizer, 1.0)  # as MegaByteLM clips
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


KINDS = {  # CUDA kernel name fragments -> what they do (first match wins)
    "attention": ("flash", "fmha", "attention", "cudnn"),
    "matmul": ("gemm", "nvjet", "cutlass", "sm90_xmma", "splitk", "relu_backward_matmul"),
    "optimizer": ("adam", "multi_tensor", "foreach", "norm_kernel"),
    "triton (fused pointwise, norms)": ("triton",),
}


def time_by_kind(prof, steps: int) -> dict[str, float]:
    """ms per step of the profiled CUDA kernels, grouped by ``KINDS`` (the rest: "other")."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.self_device_time_total <= 0:
            continue
        name = event.key.lower()
        kind = next((k for k, fragments in KINDS.items() if any(f in name for f in fragments)), "other")
        totals[kind] = totals.get(kind, 0.0) + event.self_device_time_total / 1e3 / steps
    return totals


def run(
    config: str, overrides: list[str], steps: int, compile: bool, trace: str | None, mode: str | None,
    short_attention: str = "auto",
) -> None:  # fmt: skip
    cli = main([f"--config={config}", *overrides, "--trainer.logger=false"], run=False)
    torch.manual_seed(0)
    model = build_model(cli.model.config, short_attention).cuda()
    loss_fn = byte_bits
    if compile:  # as MegaByteLM.configure_model does
        model.compile(fullgraph=True, dynamic=False, options=inductor_options(mode or "default"))
        loss_fn = torch.compile(byte_bits, fullgraph=True, dynamic=False)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, fused=True)
    B, T = cli.datamodule.batch_size, cli.datamodule.seq_len
    x = torch.randint(0, 256, (B, T), device="cuda")
    for _ in range(5):
        step_fn(model, optimizer, x, loss_fn)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(model, optimizer, x, loss_fn)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    fpb = training_flops_per_byte(cli.model.config, T)
    print(f"compile={compile} mode={mode}: {seconds * 1e3:.1f} ms/step, {B * T / seconds:,.0f} bytes/s, "
          f"MFU {B * T / seconds * fpb / 989.4e12:.1%}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step_fn(model, optimizer, x, loss_fn)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
    kinds = time_by_kind(prof, 3)
    print(f"compile={compile}: GPU ms per step by kind: "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
          + f"; all {sum(kinds.values()):.2f}")
    if trace:
        prof.export_chrome_trace(f"{trace}/trace_compile{int(compile)}.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--trace")
    parser.add_argument("--eager", action="store_true", help="also profile the eager model")
    parser.add_argument("--mode", help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--short_attention", choices=BACKENDS, default="auto", help="megabyte.attention's backend")
    args, overrides = parser.parse_known_args()
    if args.eager:
        run(args.config, overrides, args.steps, False, args.trace, None, args.short_attention)
    run(args.config, overrides, args.steps, True, args.trace, args.mode, args.short_attention)
