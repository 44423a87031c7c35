"""Compute-matched quality: MegaByte against the byte Transformer, and general-purpose compressors.

Three subcommands, each usable alone (each model's ``train`` fits in one 10-minute GPU job)::

    python benchmarks/quality.py train --config configs/bench/quality/text-megabyte-p2.yaml --out results \\
        --data.path $MEGABYTE_DATA/text/docs-prose.txt.gz
    python benchmarks/quality.py train --config configs/bench/quality/text-transformer.yaml --out results \\
        --data.path $MEGABYTE_DATA/text/docs-prose.txt.gz
    python benchmarks/quality.py compressors --data $MEGABYTE_DATA/text/docs-prose.txt.gz --out results
    python benchmarks/quality.py table results --plot results/val_bpb.png

``train`` fits a config through the product's own path (``cli.main(["fit", ...])``; extra arguments go
to the CLI unchanged), then tests the checkpoint it wrote last (``--test_checkpoint best``: the one of
the lowest val bpb, for a small data set that the budget may overfit) on the whole test split through
``cli.main(["test", "--ckpt_path", ...])``: plainly and, for MegaByte, with the paper's strided
inference (``--model.strided_eval true``, two passes). It writes ``DIR/<name>.json`` (name: the
config's stem): FLOPs per byte (``megabyte.flops``), optimizer steps, bytes seen, wall-clock, the
val bpb curve from the run's TensorBoard events, test bpb and the seconds each test took. Logs and
checkpoints go to ``DIR/<name>/version_<n>/``. ``last.ckpt`` is written at validations, so a run that
stops between two is tested as of the last one (``checkpoint_step``); in a 10-minute job, the config's
``max_time`` must leave time for the test passes. ``--seed 0 1 2`` runs the row once per seed
(``--seed_everything``), named ``<name>-seed<N>``; ``table`` then adds each row's mean and spread over
its seeds. ``--results FOLDER`` also writes every JSON there (e.g. ``benchmarks/results/quality/...``,
the folder the committed results live in; logs and checkpoints stay in ``--out``)::

    python benchmarks/quality.py train --config configs/bench/quality/text-megabyte-p4-cross2.yaml --out results \
        --seed 0 1 --results benchmarks/results/quality/cross-patch --data.path $MEGABYTE_DATA/text/docs-prose.txt.gz

``compressors`` compresses the same test split with ``xz -9e``, alone and given the training split
first, ``zstd --ultra -22``, ``bzip2 -9`` and ``gzip -9``, into ``DIR/compressors.json``. It needs no
GPU. A tool that is not installed is skipped with a note. The data: ``--data FILE``, a text corpus
split as the TextDataModule splits it (``--split`` must be the configs' ``data.split``), or
``--config CONFIG`` with ``--data.*`` arguments, the data of any modality. Images also get PNG (a file
per test image) and 16-bit audio FLAC (a file per test recording), their media's lossless codecs::

    python benchmarks/quality.py compressors --config configs/bench/quality/image-megabyte.yaml --out results/image \\
        --data.path $MEGABYTE_DATA/images/cifar10-train.tar.gz --data.test_path $MEGABYTE_DATA/images/cifar10-test.tar.gz

``table`` prints every result in ``DIR`` (not its subfolders: one folder a data set, e.g. ``results/image``)
as one Markdown table, in the manner of the paper's Table 2,
and plots val bpb against bytes seen and against wall-clock (``--plot``, a PNG).
"""

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import yaml
from jsonargparse import ArgumentParser
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import MegaByteCLI, main
from datamodules import AudioDataModule, ImageDataModule, TextDataModule
from datamodules.base import ByteDataModule
from megabyte import MegaByteConfig
from megabyte.flops import forward_flops_per_byte, training_flops_per_byte

COMPRESSORS_JSON = "compressors.json"

# -- train: fit, test, curve ---------------------------------------------------------------------


def data_arguments(overrides: list[str]) -> list[str]:
    """The ``--data.*`` arguments among ``overrides``, written ``--data.x=v`` or ``--data.x v``."""
    chosen = []
    for i, arg in enumerate(overrides):
        if arg.partition("=")[0].partition(".")[0] != "--data":
            continue
        chosen.append(arg)
        if "=" not in arg and i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            chosen.append(overrides[i + 1])
    return chosen


def val_curve(log_dir: str, bytes_per_step: int, started: float) -> list[dict[str, float]]:
    """``val/bpb`` of a run's TensorBoard events: one point per validation, with the bytes seen before
    it and the seconds since ``started`` (a ``time.time()``) when it was logged.

    Lightning logs a validation's metrics at the step of the last optimizer step before it, counted
    from 0 (like that step's ``train/loss``): a validation after N optimizer steps is logged at step
    N - 1, so the bytes seen are (step + 1) x the bytes of one optimizer step.
    """
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return [
        {"step": e.step, "bytes": (e.step + 1) * bytes_per_step, "seconds": e.wall_time - started, "bpb": e.value}
        for e in events.Scalars("val/bpb")
    ]


def run_cli(args: list[str]) -> MegaByteCLI:
    """``cli.main(args)`` after clearing torch.compile's caches: every CLI call builds and compiles a new
    model, and dynamo counts those compilations against its limit of 8 per code object (the fit, its
    validation and the test calls of one run exceed it). Compiled kernels stay in inductor's disk cache."""
    torch._dynamo.reset()
    return main(args)


def evaluate(ckpt: str, arguments: list[str], strided: bool) -> tuple[float, float]:
    """(test bpb over the whole test split, seconds of the call) of ``cli.py test --ckpt_path ckpt``,
    logged as version "plain" or "strided". The seconds include building the model and the data and,
    on a GPU, compiling."""
    version = "strided" if strided else "plain"
    start = time.perf_counter()
    cli = run_cli(["test", f"--ckpt_path={ckpt}", *arguments, f"--trainer.logger.init_args.version={version}",
                f"--model.strided_eval={strided}"])  # fmt: skip
    seconds = time.perf_counter() - start
    return cli.trainer.callback_metrics["test/bpb"].item(), seconds


def bpb_by_patch_position(ckpt: str, arguments: list[str], patch_size: int, path: Path) -> list[float]:
    """Test bpb of the plain pass at each position of a patch (0..P-1), from the bits ``cli.py predict``
    writes to ``path``: where in its patches the model spends its bits, which decides what strided
    inference gains. Windows start at multiples of seq_len (a multiple of P): byte i sits at i % P."""
    run_cli(["predict", f"--ckpt_path={ckpt}", *arguments, "--trainer.logger.init_args.version=predict",
          f"--predictions.path={path}", "--model.strided_eval=false"])  # fmt: skip
    bits = np.load(path)
    return [float(bits[p::patch_size].mean(dtype=np.float64)) for p in range(patch_size)]


def split_bytes(datamodule: ByteDataModule, split: str) -> int:
    """Bytes in a split of a set-up DataModule: a text or audio split is one byte stream, an image split
    holds images of seq_len bytes."""
    rows = datamodule.splits[split]
    return len(rows) * datamodule.seq_len if isinstance(datamodule, ImageDataModule) else len(rows)


def split_data(datamodule: ByteDataModule, split: str) -> bytes:
    """The bytes of a set-up DataModule's split: a text or audio byte stream, or its images one after another."""
    rows = datamodule.splits[split]
    if isinstance(datamodule, ImageDataModule):
        return b"".join(rows[i].numpy().tobytes() for i in range(len(rows)))
    return np.asarray(rows).tobytes()


def train(config: str, out: Path, name: str, overrides: list[str], test_checkpoint: str = "last") -> dict[str, Any]:
    """Fit ``config`` (with the CLI ``overrides``), test its ``last`` checkpoint or its ``best`` one (lowest
    val bpb: for a small data set that the budget overfits), return the figures."""
    run_folder = [
        f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={name}",
        f"--trainer.default_root_dir={out / name}", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    started, start = time.time(), time.perf_counter()
    cli = run_cli(["fit", f"--config={config}", *overrides, *run_folder])
    fit_seconds = time.perf_counter() - start
    trainer, datamodule, lm = cli.trainer, cli.datamodule, cli.model
    device = trainer.strategy.root_device  # the model itself is back on the CPU after fit
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    bytes_per_step = datamodule.batch_size * datamodule.seq_len * trainer.accumulate_grad_batches * trainer.world_size
    curve = val_curve(trainer.logger.log_dir, bytes_per_step, started)

    # The model and the data come from the checkpoint (the --data.* arguments given again hold the same
    # values); the Trainer does not: test on the fit's kind of device and precision, on one device (a
    # DistributedSampler would repeat windows to even out the shards), logged inside the run's folder.
    checkpoints = trainer.checkpoint_callback
    ckpt = checkpoints.best_model_path if test_checkpoint == "best" else checkpoints.last_model_path
    if not ckpt:
        raise RuntimeError(f"the fit wrote no {test_checkpoint} checkpoint (no validation ran?)")
    ckpt_step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    test_trainer = [
        f"--trainer.accelerator={device.type}", "--trainer.devices=1", f"--trainer.precision={trainer.precision}",
        f"--trainer.logger.init_args.save_dir={trainer.logger.log_dir}", "--trainer.logger.init_args.name=test",
        f"--trainer.default_root_dir={trainer.logger.log_dir}", "--trainer.enable_progress_bar=false",
        f"--checkpoint.dirpath={Path(ckpt).parent}",  # the fit's (a test saves none): its state restores quietly
    ]  # fmt: skip
    arguments = [*data_arguments(overrides), *test_trainer]
    test_bpb, test_seconds = evaluate(ckpt, arguments, strided=False)
    strided_bpb = strided_seconds = by_position = None
    if isinstance(lm.config, MegaByteConfig):  # the ByteTransformer has no patches to offset
        strided_bpb, strided_seconds = evaluate(ckpt, arguments, strided=True)
        by_position = bpb_by_patch_position(ckpt, arguments, lm.config.patch_size, out / f"{name}_test_bits.npy")
    forward = forward_flops_per_byte(lm.config, datamodule.seq_len)
    return {
        "name": name,
        "config": config,
        "overrides": overrides,
        "seed": cli.config.fit.seed_everything,
        "model": type(lm.model).__name__,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": str(trainer.precision),
        "batch": datamodule.batch_size,
        "seq_len": datamodule.seq_len,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "world_size": trainer.world_size,
        "fit_seconds": fit_seconds,
        "steps": trainer.global_step,
        "bytes_seen": trainer.global_step * bytes_per_step,
        "training_flops_per_byte": training_flops_per_byte(lm.config, datamodule.seq_len),
        "forward_flops_per_byte": forward.linear + forward.attention + forward.short_attention,
        "val_curve": curve,
        "checkpoint": ckpt,
        "tested_checkpoint": test_checkpoint,
        "checkpoint_step": ckpt_step,  # last.ckpt is written at validations: the last one's step
        "test_bytes": split_bytes(datamodule, "test"),
        "test_bpb": test_bpb,
        "test_seconds": test_seconds,
        "strided_test_bpb": strided_bpb,  # two passes: twice the forward FLOPs per byte
        "strided_test_seconds": strided_seconds,
        "test_bpb_by_patch_position": by_position,  # the plain pass; MegaByte only
        "peak_memory_gib": peak_memory,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# -- compressors ---------------------------------------------------------------------------------

COMPRESSORS = (
    ("xz", ["xz", "-9e", "-T1"], False),
    ("xz, training split first", ["xz", "-9e", "-T1"], True),
    ("zstd", ["zstd", "--ultra", "-22"], False),
    ("bzip2", ["bzip2", "-9"], False),
    ("gzip", ["gzip", "-9"], False),
)
"""(name, command, given the training split first). xz -9's dictionary is 64 MiB: given a longer
training split, the test bytes can refer back to its last 64 MiB only."""


def compressed_size(command: list[str], data: bytes) -> int:
    """Bytes ``command`` writes to stdout when given ``data`` on stdin."""
    return len(subprocess.run(command, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True).stdout)


def compressed_test_split(command: list[str], train: bytes, test: bytes, given_train: bool) -> int:
    """Compressed bytes of the test split: alone, or what it adds to the compressed training split."""
    if not given_train:
        return compressed_size(command, test)
    return compressed_size(command, train + test) - compressed_size(command, train)


def png_size(datamodule: ImageDataModule, test: bytes) -> int:
    """Bytes of the test images as PNG files, one file per image (Pillow, compress_level 9, optimized)."""
    total = 0
    for start in range(0, len(test), datamodule.seq_len):
        pixels = datamodule.decode(test[start : start + datamodule.seq_len]).permute(1, 2, 0).numpy()  # (H, W, C)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if datamodule.channels == 1 else pixels).save(buffer, "PNG", optimize=True)
        total += len(buffer.getvalue())
    return total


def flac_size(datamodule: AudioDataModule, test: bytes) -> int:
    """Bytes of the test recordings (16-bit PCM) as FLAC files, one file per recording (libsndfile)."""
    total, offset = 0, 0
    for n_bytes in datamodule.files["test"].values():
        samples = np.frombuffer(test[offset : offset + n_bytes], dtype="<i2")
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, datamodule.sample_rate, format="FLAC", subtype="PCM_16")
        total, offset = total + len(buffer.getvalue()), offset + n_bytes
    return total


def media_codec(datamodule: ByteDataModule) -> tuple[str, str, Any] | None:
    """(name, command, size function) of the lossless codec of the data's medium: PNG for images, FLAC
    for 16-bit PCM audio; None for text (and mu-law audio, which FLAC does not take)."""
    if isinstance(datamodule, ImageDataModule):
        return "PNG", "Pillow PNG -9, a file per image", png_size
    if isinstance(datamodule, AudioDataModule) and datamodule.encoding == "pcm16":
        return "FLAC", "libsndfile FLAC, a file per recording", flac_size
    return None


def compressors(datamodule: ByteDataModule, source: dict[str, Any]) -> list[dict[str, Any]]:
    """Bits per byte of each compressor on the test split of ``datamodule`` (prepared and set up here):
    the general-purpose tools on its bytes, and the medium's own lossless codec (``media_codec``).
    ``source``: what the rows record about the data."""
    datamodule.prepare_data()
    datamodule.setup("test")
    train, test = (split_data(datamodule, s) for s in ("train", "test"))
    installed = [c for c in COMPRESSORS if shutil.which(c[1][0])]
    with ThreadPoolExecutor(max(1, len(installed))) as pool:  # single-threaded tools: run them side by side
        sizes = pool.map(lambda c: compressed_test_split(c[1], train, test, c[2]), installed)
        costs = {name: size for (name, _, _), size in zip(installed, sizes)}
    tools = list(COMPRESSORS)
    codec = media_codec(datamodule)
    if codec is not None:
        name, command, size = codec
        costs[name] = size(datamodule, test)
        tools.append((name, [command], False))
    results = []
    for name, command, given_train in tools:
        result = {"tool": name, "command": " ".join(command), "given_training_split": given_train, **source,
                  "test_bytes": len(test), "train_bytes": len(train)}  # fmt: skip
        if name in costs:
            result.update(compressed_bytes=costs[name], bits_per_byte=8 * costs[name] / len(test))
        else:
            result.update(bits_per_byte=None, note=f"{command[0]} is not installed: skipped")
        results.append(result)
    return results


def datamodule_from_config(config: str, overrides: list[str]) -> ByteDataModule:
    """The DataModule of a CLI config file's ``data:`` block, with ``--data.*`` arguments on top."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ByteDataModule, "data", required=True)
    data = yaml.safe_load(Path(config).read_text())["data"]
    namespace = parser.parse_args([f"--data={json.dumps(data)}", *overrides])
    # jsonargparse 4.49 renamed instantiate_classes to instantiate
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(namespace).data


# -- table and plot ------------------------------------------------------------------------------


def read_results(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, compressors): the JSON of every ``train`` in ``folder`` (sorted by file name; other JSON
    files are left out) and the rows of compressors.json."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != COMPRESSORS_JSON]
    runs = [r for r in results if isinstance(r, dict) and "val_curve" in r]
    compressor_file = folder / COMPRESSORS_JSON
    return runs, json.loads(compressor_file.read_text()) if compressor_file.is_file() else []


def si(x: float) -> str:
    """3 significant digits and an SI prefix: 3.61 M, 1.02 G."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g}"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def bpb(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def eval_seconds(r: dict[str, Any]) -> str:
    strided = "-" if r["strided_test_seconds"] is None else f"{r['strided_test_seconds']:.1f}"
    return f"{r['test_seconds']:.1f} / {strided}"


HEADER = (
    "| run | model | parameters | training FLOPs/byte | steps | bytes seen | training FLOPs | training wall-clock "
    "| test bpb | strided test bpb | test eval s (plain / strided) |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def table(runs: list[dict[str, Any]], compressor_rows: list[dict[str, Any]]) -> str:
    """A Markdown table: a row per run, then a row per compressor (bits per byte of the same test split)."""
    rows = [HEADER]
    for r in runs:
        rows.append(
            f"| {r['name']} | {r['model']} | {si(r['parameters'])} | {si(r['training_flops_per_byte'])} "
            f"| {r['steps']:,} | {si(r['bytes_seen'])} | {si(r['training_flops_per_byte'] * r['bytes_seen'])} "
            f"| {minutes(r['fit_seconds'])} | {bpb(r['test_bpb'])} | {bpb(r['strided_test_bpb'])} | {eval_seconds(r)} |"
        )
    for c in compressor_rows:
        rows.append(f"| `{c['command']}`{' given the training split' if c['given_training_split'] else ''} "
                    f"| compressor | - | - | - | - | - | - | {bpb(c['bits_per_byte'])} | - | - |")  # fmt: skip
    return "\n".join(rows)


def notes(runs: list[dict[str, Any]], compressor_rows: list[dict[str, Any]]) -> list[str]:
    """Lines under the table: each run's device, precision and date; skipped tools; the test split."""
    lines = []
    for r in runs:
        memory = "" if r["peak_memory_gib"] is None else f", peak {r['peak_memory_gib']:.1f} GiB"
        lines.append(f"- {r['name']}: {r['device']}, {r['precision']}{memory}, batch {r['batch']} x {r['seq_len']} "
                     f"bytes, tested at step {r['checkpoint_step']:,}, {r['date']}")  # fmt: skip
    lines += seed_summary(runs)
    lines += [f"- {c['tool']}: {c['note']}" for c in compressor_rows if c.get("note")]
    unrecorded = [r["name"] for r in runs if r["test_bytes"] is None]  # results written before it was recorded
    if unrecorded:
        lines.append(f"- test split size not recorded: {', '.join(unrecorded)}")
    test_bytes = {r["test_bytes"] for r in runs if r["test_bytes"] is not None} | {c["test_bytes"] for c in compressor_rows}
    if len(test_bytes) == 1:
        lines.append(f"- test split: {test_bytes.pop():,} bytes, the same for every row that records it")
    elif test_bytes:
        lines.append(f"- WARNING: the rows' test splits differ ({sorted(test_bytes)} bytes)")
    return lines


def seed_summary(runs: list[dict[str, Any]]) -> list[str]:
    """A line per row run with several seeds (runs named ``<row>-seed<N>``): test bpb mean, sample standard
    deviation and range over its seeds, and the same for the strided pass."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        row, _, seed = r["name"].rpartition("-seed")
        if row and seed.isdigit():
            rows.setdefault(row, []).append(r)
    lines = []
    for row, seeded in rows.items():
        if len(seeded) < 2:
            continue
        parts = []
        for key, label in (("test_bpb", "test bpb"), ("strided_test_bpb", "strided")):
            values = np.array([r[key] for r in seeded if r[key] is not None])
            if len(values) == len(seeded):
                parts.append(f"{label} {values.mean():.4f} +- {values.std(ddof=1):.4f} ({values.min():.4f}..{values.max():.4f})")
        seeds = ", ".join(r["name"].rpartition("-seed")[2] for r in seeded)
        lines.append(f"- {row} over seeds {seeds}: {'; '.join(parts)}")
    return lines


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """One PNG: val bpb against bytes seen (left) and against wall-clock seconds of the fit (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_bytes, by_seconds) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in runs:
        points = r["val_curve"]
        label = f"{r['name']} ({r['model']})"
        by_bytes.plot([p["bytes"] for p in points], [p["bpb"] for p in points], marker="o", label=label)
        by_seconds.plot([p["seconds"] for p in points], [p["bpb"] for p in points], marker="o", label=label)
    by_bytes.set(xlabel="bytes seen", ylabel="val bpb", title="val bpb against bytes seen")
    by_seconds.set(xlabel="wall-clock since the fit started (s)", title="val bpb against wall-clock")
    for ax in (by_bytes, by_seconds):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------


def cli_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="subcommand", required=True)
    train_parser = subcommands.add_parser("train", allow_abbrev=False, help="fit a config, test its checkpoint")
    train_parser.add_argument("--config", required=True)
    train_parser.add_argument("--out", required=True, type=Path, help="folder of the results")
    train_parser.add_argument("--name", help="name of the run; default: the config file's stem")
    train_parser.add_argument("--test_checkpoint", choices=("last", "best"), default="last",
                              help="test the fit's last checkpoint or its best (lowest val bpb)")
    train_parser.add_argument("--seed", type=int, nargs="+",
                              help="run once per seed (--seed_everything), named <name>-seed<N>; default: the config's")
    train_parser.add_argument("--results", type=Path, help="also write every run's JSON into this folder")
    compressor_parser = subcommands.add_parser("compressors", allow_abbrev=False, help="compress the test split")
    compressor_parser.add_argument("--data", help="a text corpus, as --data.path of TextDataModule")
    compressor_parser.add_argument("--config", help="a config file: its data (any modality), with --data.* arguments on top")
    compressor_parser.add_argument("--out", required=True, type=Path, help="folder of the results")
    compressor_parser.add_argument("--split", type=float, nargs=3, help="with --data: train / val / test (default 0.9 0.05 0.05)")
    compressor_parser.add_argument("--cache_dir", help="with --data: TextDataModule's cache_dir (default: its default)")
    table_parser = subcommands.add_parser("table", allow_abbrev=False, help="print the table, plot the val curves")
    table_parser.add_argument("folder", type=Path)
    table_parser.add_argument("--plot", type=Path, help="the PNG; default FOLDER/val_bpb.png")
    args, overrides = parser.parse_known_args(argv)
    if overrides and not (args.subcommand == "train" or args.subcommand == "compressors" and args.config):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")

    if args.subcommand == "train":
        # cli.main gets its arguments from here, not from this script's command line
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        name = args.name or Path(args.config).stem
        runs = [(name, overrides)] if args.seed is None else [
            (f"{name}-seed{seed}", [*overrides, f"--seed_everything={seed}"]) for seed in args.seed
        ]  # fmt: skip
        for folder in (args.out, args.results):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        for run_name, run_overrides in runs:
            r = train(args.config, args.out, run_name, run_overrides, args.test_checkpoint)
            text = json.dumps(r, indent=1) + "\n"
            (args.out / f"{run_name}.json").write_text(text)
            if args.results is not None:
                (args.results / f"{run_name}.json").write_text(text)
            strided = "" if r["strided_test_bpb"] is None else f" (strided {r['strided_test_bpb']:.4f})"
            last_val = f"{r['val_curve'][-1]['bpb']:.4f}" if r["val_curve"] else "-"
            print(f"{run_name}: {r['model']} {si(r['parameters'])} parameters, {r['steps']:,} steps, "
                  f"{si(r['bytes_seen'])} bytes in {minutes(r['fit_seconds'])}; val bpb {last_val}; "
                  f"test bpb {r['test_bpb']:.4f}{strided} -> {args.out / f'{run_name}.json'}")  # fmt: skip
    elif args.subcommand == "compressors":
        if (args.data is None) == (args.config is None):
            parser.error("compressors takes --data FILE (a text corpus) or --config CONFIG (its data: block)")
        if args.config is not None:
            if args.split is not None or args.cache_dir is not None:
                parser.error("--split and --cache_dir go with --data: with --config, give --data.split and --data.cache_dir")
            results = compressors(datamodule_from_config(args.config, overrides), {"data": args.config, "overrides": overrides})
        else:
            split = tuple(args.split or (0.9, 0.05, 0.05))
            datamodule = TextDataModule(args.data, seq_len=1, split=split, num_workers=0, cache_dir=args.cache_dir)
            results = compressors(datamodule, {"data": args.data, "split": split})
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / COMPRESSORS_JSON).write_text(json.dumps(results, indent=1) + "\n")
        for c in results:
            figure = f"{c['bits_per_byte']:.4f} bits per byte" if c["bits_per_byte"] is not None else c["note"]
            print(f"{c['tool']} ({c['command']}): {figure} on {c['test_bytes']:,} test bytes")
    else:
        runs, compressor_rows = read_results(args.folder)
        if not runs and not compressor_rows:
            sys.exit(f"no results in {args.folder}")
        print(table(runs, compressor_rows))
        print("\n".join(notes(runs, compressor_rows)))
        if runs:
            plot_path = args.plot or args.folder / "val_bpb.png"
            plot(runs, plot_path)
            print(f"plot: {plot_path}")


if __name__ == "__main__":
    cli_main()
