"""Compression with a trained model: size against the model's bits and general-purpose compressors, and speed.

    python benchmarks/compress_speed.py --ckpt_path CKPT FILE [FILE ...] --batch_size 256 --out compress.json
    python benchmarks/compress_speed.py --ckpt_path CKPT --test_split_of $MEGABYTE_DATA/text/docs-prose.txt.gz \\
        --write_split docs-prose-test.bin --out compress.json

For each input: a warm-up round trip of its first chunks, then ``compress`` and ``decompress`` of all of
it, each timed (``torch.cuda.synchronize`` before the clock stops), and the result checked bit for bit.
Reported: bytes, compressed bytes (header included), bits per byte, the model's plain bits per byte on
the same chunks (a parallel forward pass over each chunk, as ``test`` scores windows of the same length)
and the ratio of the compressed size to those bits / 8 (the target: within 1 %), bytes/s both ways, the
batch size and chunk length; then ``xz -9e``, ``zstd -19``, ``bzip2 -9`` and ``gzip -9`` on the same file
where they are installed (skipped with a note otherwise), with their bytes/s.

``--test_split_of PATH`` adds the test split of the text corpus PATH, cut as the TextDataModule cuts it
(``--split``, default: the checkpoint's ``data.split``): the bytes ``test`` scores. ``--write_split FILE``
also writes those bytes to FILE (e.g. for ``megabyte compress``).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

import megabyte
from megabyte.bits import byte_bits
from megabyte.compression import choose_mode, read_header

COMPRESSORS = (("xz", ["xz", "-9e", "-T1", "-c"]), ("zstd", ["zstd", "-19", "-c"]), ("bzip2", ["bzip2", "-9", "-c"]), ("gzip", ["gzip", "-9", "-c"]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_bits(model: torch.nn.Module, data: bytes, chunk_len: int, batch_size: int) -> float:
    """Bits the model's parallel forward pass spends on ``data``, chunk by chunk of ``chunk_len`` bytes
    (each read from its own start, the last one shorter)."""
    device = next(model.parameters()).device
    x = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    full = len(x) // chunk_len * chunk_len
    total = 0.0
    windows = x[:full].view(-1, chunk_len)  # (n, chunk_len)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        total += byte_bits(model(batch), batch).double().sum().item()
    if full < len(x):
        rest = x[full:][None].to(device)  # (1, L)
        total += byte_bits(model(rest), rest).double().sum().item()
    return total


def other_compressors(data: bytes) -> list[dict[str, Any]]:
    rows = []
    for name, command in COMPRESSORS:
        if shutil.which(command[0]) is None:
            rows.append({"tool": name, "command": " ".join(command), "note": f"{command[0]} is not installed: skipped"})
            continue
        started = time.perf_counter()
        size = len(subprocess.run(command, input=data, stdout=subprocess.PIPE, check=True).stdout)
        seconds = time.perf_counter() - started
        rows.append({"tool": name, "command": " ".join(command), "compressed_bytes": size,
                     "bits_per_byte": 8 * size / max(len(data), 1), "compress_bytes_per_s": len(data) / seconds})  # fmt: skip
    return rows


def test_split(path: str, split: tuple[float, float, float], cache_dir: str | None) -> bytes:
    """The test split of the text corpus ``path``, as the TextDataModule cuts it (what ``test`` scores)."""
    from datamodules import TextDataModule

    datamodule = TextDataModule(path, seq_len=1, split=split, num_workers=0, cache_dir=cache_dir)
    datamodule.prepare_data()
    datamodule.setup("test")
    return np.asarray(datamodule.splits["test"]).tobytes()


def measure(pretrained: Any, name: str, data: bytes, chunk_len: int, batch_size: int, medium: bool | None) -> dict[str, Any]:
    device = pretrained.device
    warm = data[: 2 * chunk_len]
    pretrained.decompress(pretrained.compress(warm, chunk_len, batch_size, medium))  # first kernels, lazy loading
    sync(device)
    started = time.perf_counter()
    blob = pretrained.compress(data, chunk_len, batch_size, medium)
    sync(device)
    compressed = time.perf_counter()
    out = pretrained.decompress(blob)
    sync(device)
    decompressed = time.perf_counter()
    header = read_header(blob)
    lossless = header.output_crc32 == zlib.crc32(data) and header.output_length == len(data)
    # bit-exact: the file itself, or (--medium true on a file its content does not give back) the medium's file promised
    exact = out == data if lossless else zlib.crc32(out) == header.output_crc32 and len(out) == header.output_length
    result = {
        "file": name, "bytes": len(data), "mode": header.mode, "coded_bytes": header.length,
        "compressed_bytes": len(blob), "header_bytes": header.size, "bits_per_byte": 8 * len(blob) / max(len(data), 1),
        "lossless": lossless, "bit_exact": exact,
        "compress_seconds": compressed - started, "decompress_seconds": decompressed - compressed,
        "compress_bytes_per_s": len(data) / (compressed - started),
        "decompress_bytes_per_s": len(data) / (decompressed - compressed),
        "batch_size": batch_size, "chunk_len": chunk_len, "streams": len(header.stream_words),
    }  # fmt: skip
    if header.length:
        coded = choose_mode(pretrained, data, medium)[1]  # the bytes the coder coded: the file's, or its medium's content
        bits = forward_bits(pretrained.model, coded, chunk_len, batch_size)
        result["model_bits_per_byte"] = bits / len(coded)  # per coded byte
        result["size_over_model_bits"] = len(blob) / (bits / 8)  # the target: within 1 % (header included)
    result["compressors"] = other_compressors(data)
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| file | bytes | model bpb | compressed bpb | size / model bits | compress B/s | decompress B/s | bit-exact | "
             "xz -9e | zstd -19 | bzip2 -9 | gzip -9 |", "|" + "---|" * 12]  # fmt: skip
    for r in results:
        others = {c["tool"]: f"{c['bits_per_byte']:.3f}" if "bits_per_byte" in c else "-" for c in r["compressors"]}
        model_bpb = f"{r['model_bits_per_byte']:.4f}" if "model_bits_per_byte" in r else "-"
        ratio = f"{r['size_over_model_bits']:.4f}" if "size_over_model_bits" in r else "-"
        lines.append(
            f"| {r['file']} | {r['bytes']:,} | {model_bpb} | {r['bits_per_byte']:.4f} | {ratio} | "
            f"{r['compress_bytes_per_s']:,.0f} | {r['decompress_bytes_per_s']:,.0f} | {r['bit_exact']} | "
            + " | ".join(others[t] for t, _ in COMPRESSORS) + " |"
        )
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint (.ckpt) or an exported folder")
    parser.add_argument("files", nargs="*", type=Path, help="files to compress")
    parser.add_argument("--test_split_of", help="also the test split of this text corpus (as TextDataModule's data.path)")
    parser.add_argument("--split", type=float, nargs=3, help="with --test_split_of: train / val / test (default: the checkpoint's)")
    parser.add_argument("--cache_dir", help="with --test_split_of: TextDataModule's cache_dir")
    parser.add_argument("--write_split", type=Path, help="with --test_split_of: write the test split's bytes to this file")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--chunk_len", type=int, help="default: the model's max_seq_len")
    parser.add_argument("--medium", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--device", help="default: cuda where there is a GPU")
    parser.add_argument("--dtype", help="the weights' dtype (default float32)")
    parser.add_argument("--out", type=Path, help="write the results as one JSON file")
    args = parser.parse_args(argv)
    if not args.files and args.test_split_of is None:
        parser.error("give files to compress, --test_split_of a text corpus, or both")
    if args.write_split is not None and args.test_split_of is None:
        parser.error("--write_split goes with --test_split_of")
    pretrained = megabyte.load(args.ckpt_path, device=args.device, dtype=args.dtype)
    chunk_len = args.chunk_len or pretrained.config.max_seq_len
    medium = {"auto": None, "true": True, "false": False}[args.medium]
    inputs = [(str(f), f.read_bytes()) for f in args.files]
    if args.test_split_of is not None:
        init_args = pretrained.data.get("init_args", {})
        split = tuple(args.split or init_args.get("split", (0.9, 0.05, 0.05)))
        data = test_split(args.test_split_of, split, args.cache_dir)
        if args.write_split is not None:
            args.write_split.write_bytes(data)
        inputs.append((f"test split {list(split)} of {args.test_split_of}", data))
    device = pretrained.device
    results = [measure(pretrained, name, data, chunk_len, args.batch_size, medium) for name, data in inputs]
    summary = {
        "ckpt_path": args.ckpt_path, "model": type(pretrained.model).__name__,
        "parameters": sum(p.numel() for p in pretrained.model.parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(pretrained.model.parameters()).dtype).removeprefix("torch."),
        "float32_matmul_precision": torch.get_float32_matmul_precision(), "results": results,
    }  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['model']} ({summary['parameters'] / 1e6:.1f} M parameters) on {summary['device']}, "
          f"batch_size {args.batch_size}, chunk_len {chunk_len}")  # fmt: skip
    print(table(results))
    if not all(r["bit_exact"] for r in results):
        sys.exit("a round trip was not bit-exact")


if __name__ == "__main__":
    cli_main()
