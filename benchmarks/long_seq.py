"""Million-byte sequences on one GPU: MegaByte's training step at 64K, 256K and 1M bytes, the longest
sequence the byte Transformer of its global model's depth and width trains, and generation after a
1M-byte prompt.

    python benchmarks/long_seq.py --out long_seq.json [--config configs/long/megabyte-1m.yaml]
        [--seq_lens 65536 262144 1048576] [--compile] [--data.path FILE] [other CLI overrides]

1. MegaByte, as the config builds it (its ``activation_checkpointing`` and ``local_chunk_patches``
   included), on random bytes of each ``--seq_lens`` length (batch 1: one sequence a step; the model's
   ``max_seq_len`` is the length): ``--warmup`` untimed steps, then ``--steps`` steps each timed between
   two device synchronisations; their median, bytes/s and the peak of ``torch.cuda.max_memory_allocated``
   (reset for each length). The step is MegaByteLM's: forward under the config's precision, mean bits
   per byte, backward, gradient clipping, AdamW (``profile_step.step_fn``). ``--compile`` compiles the
   model as MegaByteLM does (the config's ``compile_mode``; one compilation a length).
2. The ByteTransformer with MegaByte's global depth, width and heads, with its stack checkpointed and
   without: sequence lengths doubling from ``--search_from`` up to ``--search_to`` until a step runs out
   of GPU memory, then ``--bisections`` probes between the last length that fit and the first that did
   not. A probe is one step at its length after one at ``--search_from`` (which allocates AdamW's state);
   eager. A length whose step would take longer than ``--max_step_seconds`` (extrapolated from the last
   two probes) is not tried: its result says so. Its learned positions are T x d_model parameters (1.07 B
   at T = 1M and d_model 1024: 17 GB with their gradient and AdamW's moments), counted in its memory.
3. Generation with MegaByte (the config's, ``max_seq_len`` grown to hold the prompt and the new bytes;
   random weights): a ``--prompt_bytes`` prompt from the validation split (with ``--data.path``) or random
   bytes. Time to first byte: ``generate(model, prompt, 1)``, the prefill and the first byte sampled, synchronised
   (median of 3); then bytes/s of the ``--new_bytes`` after it: ``generate(model, prompt, 1 + N)`` minus the first.
   Under bf16-mixed the model is cast to bf16 once (``generate`` would copy it at every call).

Writes JSON (``--out``) and prints a table last. On an H100, ``--max_step_seconds 60 --new_bytes 4096``
took 110 s; the default cap of 120 s also tries the checkpointed
ByteTransformer at 524,288 bytes (about 75 s a step, extrapolated). Runs on the CPU with a tiny model for the tests
(``--trainer.accelerator=cpu --trainer.precision=32-true`` and small ``--model.arch.init_args.*``);
peak memory is then None and no length runs out of memory.
"""

import argparse
import dataclasses
import gc
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from profile_step import step_fn

from cli import main
from datamodules.base import ByteDataModule
from megabyte.bits import byte_bits
from megabyte.config import ByteTransformerConfig, MegaByteConfig, ModelConfig
from megabyte.generation import generate
from megabyte.model import build_model
from megabyte.optim import parameter_groups
from megabyte.parallelize import inductor_options, parallelize

SEQ_LENS = (65536, 262144, 1048576)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Give back the GPU memory a finished (or out-of-memory) trial held, compilations included, and
    restart the peak count."""
    if device.type == "cuda":
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(config: ModelConfig, memory: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The model of ``config`` on ``device`` (initialised there), with MegaByteLM's memory options."""
    with device:
        return parallelize(build_model(config), **memory)


def time_steps(
    config: ModelConfig, memory: dict[str, Any], seq_len: int, warmup_len: int, warmup: int, steps: int,
    device: torch.device, context, compile_mode: str | None = None,
) -> dict[str, Any]:
    """Train ``warmup`` steps of ``warmup_len`` bytes, then ``steps`` timed ones of ``seq_len`` bytes
    (batch 1, random bytes). Returns the times, or status "out of memory"."""
    row: dict[str, Any] = {"seq_len": seq_len}
    free_memory(device)
    try:
        model = build(config, memory, device)
        row["parameters"] = parameters(model)
        loss_fn = byte_bits
        if compile_mode is not None:  # as MegaByteLM.configure_model does
            model.compile(fullgraph=True, dynamic=False, options=inductor_options(compile_mode))
            loss_fn = torch.compile(byte_bits, fullgraph=True, dynamic=False)
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, fused=device.type == "cuda")
        generator = torch.Generator(device).manual_seed(0)
        for _ in range(warmup):
            x = torch.randint(0, 256, (1, warmup_len), device=device, generator=generator)
            step_fn(model, optimizer, x, loss_fn, context)
        seconds = []
        for _ in range(steps):
            x = torch.randint(0, 256, (1, seq_len), device=device, generator=generator)
            synchronize(device)
            start = time.perf_counter()
            step_fn(model, optimizer, x, loss_fn, context)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        row.update(status="ok", step_seconds=statistics.median(seconds), step_seconds_all=seconds)
        row.update(bytes_per_sec=seq_len / row["step_seconds"], peak_memory_gib=peak_memory_gib(device))
    except (torch.OutOfMemoryError, RuntimeError) as error:  # a library's allocation can fail as a RuntimeError
        if not isinstance(error, torch.OutOfMemoryError) and "out of memory" not in str(error):
            raise
        row.update(status="out of memory", peak_memory_gib=peak_memory_gib(device))
    free_memory(device)  # the exception and its frames are gone: the model and optimizer go now
    return row


def estimated_step_seconds(probes: list[dict[str, Any]], seq_len: int) -> float | None:
    """A step's time at ``seq_len`` from the two longest probes that ran, t ~ seq_len^e with e between
    1 (linear layers) and 2 (attention) fitted to them (2 from a single probe); None before any ran."""
    done = sorted((p for p in probes if p["status"] == "ok"), key=lambda p: p["seq_len"])
    if not done:
        return None
    last = done[-1]
    exponent = 2.0
    if len(done) > 1 and done[-2]["step_seconds"] > 0:
        previous = done[-2]
        growth = max(last["step_seconds"] / previous["step_seconds"], 1.0)
        exponent = min(2.0, max(1.0, math.log(growth) / math.log(last["seq_len"] / previous["seq_len"])))
    return last["step_seconds"] * (seq_len / last["seq_len"]) ** exponent


def longest_trainable(
    probe: Callable[[int], dict[str, Any]], search_from: int, search_to: int, bisections: int, max_step_seconds: float,
    multiple: int = 1024,
) -> dict[str, Any]:
    """The longest length ``probe`` trains (its status "ok"): lengths doubling from ``search_from`` up to
    ``search_to`` until one runs out of memory, then ``bisections`` probes (multiples of ``multiple``)
    between the last length that fit and the first that did not. A length whose step would take more than
    ``max_step_seconds`` (``estimated_step_seconds``) is not tried: the search stops there.
    Returns the longest length (None if none fits), what limited it ("memory", "time" or "search_to")
    and every probe, by length."""
    probes: list[dict[str, Any]] = []

    def run(seq_len: int) -> dict[str, Any]:
        estimate = estimated_step_seconds(probes, seq_len)
        if estimate is not None and estimate > max_step_seconds:
            result = {"seq_len": seq_len, "status": "not tried", "estimated_step_seconds": estimate}
        else:
            result = probe(seq_len)
        probes.append(result)
        return result

    seq_len, longest, status = search_from, None, "ok"
    while seq_len <= search_to:
        status = run(seq_len)["status"]
        if status != "ok":
            break
        longest, seq_len = seq_len, 2 * seq_len
    limited_by = {"ok": "search_to", "out of memory": "memory", "not tried": "time"}[status]
    if status == "out of memory" and longest is not None:
        fits, fails = longest, seq_len
        for _ in range(bisections):
            middle = (fits + fails) // 2 // multiple * multiple
            if middle <= fits:
                break
            status = run(middle)["status"]
            if status == "not tried":
                break
            fits, fails = (middle, fails) if status == "ok" else (fits, middle)
        longest = fits
    return {"longest_seq_len": longest, "limited_by": limited_by, "probes": sorted(probes, key=lambda p: p["seq_len"])}


def transformer_like(config: MegaByteConfig, seq_len: int) -> ByteTransformerConfig:
    """The ByteTransformer with the global model's depth, width and heads (and the shared options)."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)}
    return ByteTransformerConfig(
        **{**shared, "max_seq_len": seq_len}, d_model=config.d_global, n_layers=config.n_global_layers,
        n_heads=config.n_global_heads,
    )  # fmt: skip


def validation_bytes(datamodule: ByteDataModule, n: int) -> torch.Tensor:
    """The first ``n`` bytes of the datamodule's validation split: LongTensor (n,)."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    split = torch.cat(list(datamodule.eval_dataset("val")))
    if len(split) < n:
        raise SystemExit(f"the validation split holds {len(split):,} bytes, fewer than --prompt_bytes {n:,}")
    return split[:n].long()


def time_generation(
    config: MegaByteConfig, memory: dict[str, Any], prompt: torch.Tensor, new_bytes: int, device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Time to first byte after ``prompt`` (LongTensor (n,)) and bytes/s of the ``new_bytes`` after it
    (each ``generate`` call runs a step of each kind eagerly, then captures it as a CUDA graph: included)."""
    P = config.patch_size
    max_seq_len = math.ceil((len(prompt) + 1 + new_bytes) / P) * P
    free_memory(device)
    model = build(dataclasses.replace(config, max_seq_len=max_seq_len), memory, device).eval()
    if dtype is not None:
        model.to(dtype)
    prompt = prompt[None].to(device)  # (1, n)

    def seconds_to_generate(n_bytes: int) -> float:
        generator = torch.Generator(device).manual_seed(0)
        synchronize(device)
        start = time.perf_counter()
        generate(model, prompt, n_bytes, generator=generator)
        synchronize(device)
        return time.perf_counter() - start

    seconds_to_generate(1)  # warm-up: the kernels of the prompt's shapes
    first = statistics.median(seconds_to_generate(1) for _ in range(3))
    total = seconds_to_generate(1 + new_bytes)
    return {
        "prompt_bytes": prompt.shape[1], "new_bytes": new_bytes, "max_seq_len": max_seq_len,
        "dtype": str(dtype or torch.get_default_dtype()), "time_to_first_byte_s": first,
        "bytes_per_sec_after_first": new_bytes / max(total - first, 1e-9), "seconds_with_prefill": total,
        "peak_memory_gib": peak_memory_gib(device),
    }  # fmt: skip


def measure(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    cli = main([f"--config={args.config}", *overrides, "--trainer.logger=false"], run=False)
    config = cli.model.config
    if not isinstance(config, MegaByteConfig):
        raise SystemExit(f"{args.config} describes a {type(config).__name__}; this benchmark needs a MegaByte config")
    device = cli.trainer.strategy.root_device
    precision = str(cli.trainer.precision)
    context = cli.trainer.precision_plugin.forward_context
    hp = cli.model.hparams
    memory = {"activation_checkpointing": tuple(hp.activation_checkpointing), "local_chunk_patches": hp.local_chunk_patches}
    megabyte_global = parameters(cli.model.model.global_model)  # the models below are built on the device
    result: dict[str, Any] = {
        "config": args.config, "overrides": overrides, "precision": precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compile": args.compile, "compile_mode": hp.compile_mode if args.compile else None,
        "megabyte": {"arch": dataclasses.asdict(config), **memory, "global_stack_parameters": megabyte_global, "rows": []},
    }  # fmt: skip

    if "megabyte" in args.parts:
        for seq_len in args.seq_lens:
            row = time_steps(
                dataclasses.replace(config, max_seq_len=seq_len), memory, seq_len, seq_len, args.warmup, args.steps,
                device, context, hp.compile_mode if args.compile else None,
            )  # fmt: skip
            result["megabyte"]["rows"].append(row)
            print(table_row("MegaByte", describe(memory), row), flush=True)

    if "transformer" in args.parts:
        searches = []
        for stacks in ((), ("transformer",)):
            def probe(seq_len: int) -> dict[str, Any]:
                row = time_steps(
                    transformer_like(config, seq_len), {"activation_checkpointing": stacks}, seq_len,
                    min(args.search_from, seq_len), 1, 1, device, context,
                )  # fmt: skip
                print(table_row("ByteTransformer", describe({"activation_checkpointing": stacks}), row), flush=True)
                return row

            search = longest_trainable(probe, args.search_from, args.search_to, args.bisections, args.max_step_seconds)
            searches.append({"activation_checkpointing": stacks, **search})
        result["transformer"] = {
            "d_model": config.d_global, "n_layers": config.n_global_layers, "n_heads": config.n_global_heads,
            "searches": searches,
        }  # fmt: skip

    if "generation" in args.parts:
        from_data = any(arg.startswith("--data.path") for arg in overrides)
        if from_data:
            prompt = validation_bytes(cli.datamodule, args.prompt_bytes)
        else:
            prompt = torch.randint(0, 256, (args.prompt_bytes,), generator=torch.Generator().manual_seed(0))
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        result["generation"] = {
            "prompt": "validation split" if from_data else "random bytes",
            **time_generation(config, memory, prompt, args.new_bytes, device, dtype),
        }
        free_memory(device)
    return result


def describe(memory: dict[str, Any]) -> str:
    stacks = ", ".join(memory.get("activation_checkpointing") or ()) or "none"
    chunks = memory.get("local_chunk_patches")
    return f"checkpointed: {stacks}" + (f"; local chunks of {chunks} patches" if chunks else "")


HEADER = (
    "| model | memory options | T (bytes) | step s | bytes/s | peak GiB | parameters | status |\n"
    "|---|---|---|---|---|---|---|---|"
)


def table_row(model: str, options: str, row: dict[str, Any]) -> str:
    def number(key: str, spec: str) -> str:
        return "-" if row.get(key) is None else format(row[key], spec)

    status = row["status"]
    if "estimated_step_seconds" in row:
        status += f" (about {row['estimated_step_seconds']:.0f} s a step)"
    return (
        f"| {model} | {options} | {row['seq_len']:,} | {number('step_seconds', '.3f')} | {number('bytes_per_sec', ',.0f')} "
        f"| {number('peak_memory_gib', '.1f')} | {number('parameters', ',')} | {status} |"
    )


def table(result: dict[str, Any]) -> str:
    lines = [HEADER]
    memory = {k: result["megabyte"][k] for k in ("activation_checkpointing", "local_chunk_patches")}
    lines += [table_row("MegaByte", describe(memory), row) for row in result["megabyte"]["rows"]]
    for search in result.get("transformer", {}).get("searches", []):
        options = describe(search)
        longest = search["longest_seq_len"]
        rows = [p for p in search["probes"] if p["seq_len"] == longest]
        longer = [p for p in search["probes"] if longest is None or p["seq_len"] > longest][:1]  # what stopped it
        lines += [table_row("ByteTransformer (longest)", options, row) for row in rows]
        lines += [table_row("ByteTransformer (next)", options, row) for row in longer]
    if "generation" in result:
        g = result["generation"]
        memory_text = "" if g["peak_memory_gib"] is None else f", peak {g['peak_memory_gib']:.1f} GiB"
        lines.append(
            f"\nGeneration after a {g['prompt_bytes']:,}-byte prompt ({g['prompt']}, {g['dtype']}): first byte after "
            f"{g['time_to_first_byte_s']:.3f} s, then {g['bytes_per_sec_after_first']:,.0f} bytes/s over "
            f"{g['new_bytes']} bytes{memory_text}"
        )
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/long/megabyte-1m.yaml")
    parser.add_argument("--seq_lens", type=int, nargs="+", default=list(SEQ_LENS), help="MegaByte's lengths")
    parser.add_argument("--warmup", type=int, default=3, help="untimed MegaByte steps a length")
    parser.add_argument("--steps", type=int, default=5, help="timed MegaByte steps a length (their median)")
    parser.add_argument("--compile", action="store_true", help="compile MegaByte as MegaByteLM does")
    parser.add_argument("--search_from", type=int, default=4096, help="the ByteTransformer's first length")
    parser.add_argument("--search_to", type=int, help="the ByteTransformer's last length (default: the longest --seq_lens)")
    parser.add_argument("--bisections", type=int, default=3, help="probes between the last fit and the first out of memory")
    parser.add_argument("--max_step_seconds", type=float, default=120.0,
                        help="leave out lengths whose step would take longer")  # fmt: skip
    parser.add_argument("--prompt_bytes", type=int, default=1048576)
    parser.add_argument("--new_bytes", type=int, default=512)
    parser.add_argument("--parts", nargs="+", choices=["megabyte", "transformer", "generation"],
                        default=["megabyte", "transformer", "generation"])  # fmt: skip
    parser.add_argument("--out", help="write the results as JSON to this file")
    args, overrides = parser.parse_known_args(argv)
    if args.search_to is None:
        args.search_to = max(args.seq_lens)
    result = measure(args, overrides)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    cli_main()
