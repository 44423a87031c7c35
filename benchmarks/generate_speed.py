"""Generation speed of a config: bytes/s of key/value-cached sampling, batch 1 and batched.

    python benchmarks/generate_speed.py --config configs/bench/config-m.yaml --batch_sizes 1 64 --json out.json [CLI overrides]

Builds the model a config describes (random weights: speed does not depend on them), then for each
batch size samples ``--new_bytes`` bytes (temperature 1) after a ``--prompt_bytes`` prompt, under the
config's precision (bf16 autocast on the GPU for ``bf16-mixed``), and prints one table row per batch
size: bytes/s per sequence and in all, seconds, peak memory.
"""

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from cli import main


def graphs_match_eager(
    model: torch.nn.Module, device: torch.device, context, compile: bool, n: int = 5, new: int = 300
) -> bool:
    """Greedy and sampled bytes with CUDA graphs equal those of the decoding loop without them."""
    prompt = torch.randint(0, 256, (2, n), device=device, generator=torch.Generator(device).manual_seed(1))
    same = True
    for temperature in (0.0, 1.0):
        with context():
            runs = [
                model.generate(
                    prompt, new, temperature, generator=torch.Generator(device).manual_seed(2), cuda_graphs=g, compile=compile
                )
                for g in (False, True)
            ]
        same &= torch.equal(*runs)
    return same


def measure(
    config: str,
    overrides: list[str],
    batch_sizes: list[int],
    new_bytes: int,
    prompt_bytes: int,
    cuda_graphs: bool | None = None,
    compile: bool = False,
    weights_dtype: str | None = None,
) -> list[dict[str, Any]]:
    """``weights_dtype`` (e.g. "bfloat16"): cast the model and generate without autocast."""
    cli = main([f"--config={config}", *overrides, "--trainer.logger=false"], run=False)
    model = cli.model.model
    device = cli.trainer.strategy.root_device
    model.to(device)
    context = cli.trainer.precision_plugin.forward_context
    if weights_dtype is not None:
        model.to(getattr(torch, weights_dtype))
        context = contextlib.nullcontext
    check = None
    if device.type == "cuda" and cuda_graphs is not False:
        check = graphs_match_eager(model, device, context, compile)
    results = []
    for batch in batch_sizes:
        generator = torch.Generator(device=device).manual_seed(0)
        prompt = torch.randint(0, 256, (batch, prompt_bytes), device=device, generator=generator)
        with context():
            # Compiled steps are compiled for the shapes of a call: warm up with the same ones.
            warmup = new_bytes if compile else min(new_bytes, 64)
            model.generate(prompt, warmup, generator=generator, cuda_graphs=cuda_graphs, compile=compile)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with context():
            model.generate(prompt, new_bytes, generator=generator, cuda_graphs=cuda_graphs, compile=compile)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        results.append({
            "config": config, "overrides": overrides, "model": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": weights_dtype or str(cli.trainer.precision), "compile": compile, "batch": batch, "prompt_bytes": prompt_bytes,
            "new_bytes": new_bytes, "seconds": seconds, "bytes_per_sec_per_sequence": new_bytes / seconds,
            "bytes_per_sec": batch * new_bytes / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "cuda_graphs": device.type == "cuda" if cuda_graphs is None else cuda_graphs,
            "graphs_match_eager": check,
        })  # fmt: skip
    return results


HEADER = (
    "| model | config | precision | compiled | batch | new bytes | seconds | bytes/s per sequence | bytes/s in all "
    "| peak GiB | CUDA graphs (= without) |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(r: dict[str, Any]) -> str:
    memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
    return (
        f"| {r['model']} | {Path(r['config']).name} {' '.join(r['overrides'])} | {r['precision']} | {r['compile']} "
        f"| {r['batch']} | {r['new_bytes']} "
        f"| {r['seconds']:.2f} | {r['bytes_per_sec_per_sequence']:,.0f} | {r['bytes_per_sec']:,.0f} | {memory} "
        f"| {r['cuda_graphs']} ({r['graphs_match_eager']}) |"
    )


def cli_main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new_bytes", type=int, default=8192)
    parser.add_argument("--prompt_bytes", type=int, default=0)
    parser.add_argument("--cuda_graphs", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--compile", action="store_true", help="compile each kind of decoding step")
    parser.add_argument("--weights_dtype", help="cast the model (e.g. bfloat16) and generate without autocast")
    parser.add_argument("--json", help="append each result as one JSON line to this file")
    args, overrides = parser.parse_known_args()
    graphs = {"auto": None, "true": True, "false": False}[args.cuda_graphs]
    results = measure(
        args.config, overrides, args.batch_sizes, args.new_bytes, args.prompt_bytes, graphs, args.compile, args.weights_dtype
    )
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(HEADER)
    print("\n".join(table_row(r) for r in results))


if __name__ == "__main__":
    cli_main()
