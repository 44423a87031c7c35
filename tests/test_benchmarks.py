"""The benchmark scripts run on the CPU with a tiny config, so CI keeps them working (no timing is checked)."""

import bz2
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from benchmarks import quality
from datamodules import ImageDataModule, TextDataModule
from datamodules.image import image_to_bytes
from megabyte import MegaByte, MegaByteConfig, MegaByteLM
from megabyte.flops import training_flops_per_byte
from megabyte.bits import byte_bits
from megabyte.pretrained import Pretrained
from tests.audio_files import FSDD_TEST_PATTERN, write_wav_folder
from tests.conftest import REPO
from tests.image_files import write_image_folder

TINY = [
    "--model.arch.init_args.d_global=32", "--model.arch.init_args.n_global_heads=2",
    "--model.arch.init_args.n_global_layers=1", "--model.arch.init_args.d_local=16",
    "--model.arch.init_args.n_local_heads=2", "--model.arch.init_args.n_local_layers=1",
    "--data.seq_len=64", "--data.batch_size=2", "--data.num_workers=0",
    "--trainer.accelerator=cpu", "--trainer.precision=32-true",
]  # fmt: skip


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_speed_prints_a_row_and_writes_json(text_file, tmp_path):
    out = tmp_path / "train.jsonl"
    stdout = run("train_speed.py", "--config=configs/bench/config-m.yaml", "--warmup=1", "--steps=2",
                 f"--json={out}", f"--data.path={text_file}", f"--data.cache_dir={tmp_path}", *TINY)  # fmt: skip
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["model"] == "MegaByte" and result["batch"] == 2 and result["seq_len"] == 64
    assert result["bytes_per_sec"] > 0 and result["timed_batches"] == 2 and result["mfu"] is None
    assert result["short_attention"] == "auto"
    assert result["processes"] == 1 and len(result["losses"]) == 3  # every step's loss, warm-up included
    assert result["losses"][-1] == pytest.approx(result["final_loss"])
    # float32 parameters and gradients, AdamW's two moments of each, and a 4-byte step count a tensor
    tiny = MegaByte(MegaByteConfig(max_seq_len=64, d_global=32, n_global_heads=2, n_global_layers=1, d_local=16,
                                   n_local_heads=2, n_local_layers=1))  # fmt: skip
    state, n, tensors = result["state_gib"], result["parameters"], len(list(tiny.parameters()))
    assert n == sum(p.numel() for p in tiny.parameters())
    assert state["parameters"] * 2**30 == 4 * n and state["gradients"] * 2**30 == 4 * n
    assert state["optimizer_state"] * 2**30 == 8 * n + 4 * tensors
    assert stdout.splitlines()[-1].startswith("| MegaByte | config-m.yaml")


def test_generate_speed_prints_rows_and_writes_json(tmp_path):
    out = tmp_path / "generate.jsonl"
    stdout = run("generate_speed.py", "--config=configs/bench/config-m.yaml", "--batch_sizes", "1", "3",
                 "--new_bytes=40", "--prompt_bytes=5", "--full_cache", f"--json={out}", *TINY)  # fmt: skip
    results = [json.loads(line) for line in out.read_text().splitlines()]
    # each batch size over the caches' windows, then over their whole buffers (the decoding before windows)
    assert [(r["batch"], r["cache"]) for r in results] == [(1, "window"), (1, "full"), (3, "window"), (3, "full")]
    assert all(r["new_bytes"] == 40 for r in results)
    for r in results:
        assert r["bytes_per_sec"] > 0 and r["bytes_per_sec"] == pytest.approx(r["batch"] * r["bytes_per_sec_per_sequence"])
    lines = stdout.strip().splitlines()
    assert len(lines) == 6 and lines[3].startswith("| MegaByte | config-m.yaml")  # header, separator, four rows
    assert [line.split(" | ")[4] for line in lines[2:]] == ["window", "full"] * 2


@pytest.fixture
def long_seq(monkeypatch):
    """benchmarks/long_seq.py as a module, run in this process (a new interpreter would double the time)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the scripts import each other by name
    import long_seq

    return long_seq


def test_long_seq_reports_megabyte_the_longest_transformer_and_generation(long_seq, text_file, tmp_path, capsys):
    out = tmp_path / "long.json"
    long_seq.cli_main(["--seq_lens", "32", "64", "--warmup=1", "--steps=2", "--search_from=32", "--search_to=64",
                       "--prompt_bytes=96", "--new_bytes=8", f"--out={out}", f"--data.path={text_file}",
                       f"--data.cache_dir={tmp_path}", "--model.local_chunk_patches=3", *TINY])  # fmt: skip
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    megabyte = result["megabyte"]
    assert megabyte["activation_checkpointing"] == ["local_model"] and megabyte["local_chunk_patches"] == 3
    assert [r["seq_len"] for r in megabyte["rows"]] == [32, 64]
    for r in megabyte["rows"]:
        assert r["status"] == "ok" and len(r["step_seconds_all"]) == 2 and r["peak_memory_gib"] is None
        assert r["bytes_per_sec"] == pytest.approx(r["seq_len"] / r["step_seconds"])
    transformer = result["transformer"]
    assert (transformer["d_model"], transformer["n_layers"], transformer["n_heads"]) == (32, 1, 2)  # the global model's
    searches = transformer["searches"]
    assert [s["activation_checkpointing"] for s in searches] == [[], ["transformer"]]
    for search in searches:  # nothing runs out of memory on the CPU: every length up to --search_to fits
        assert search["longest_seq_len"] == 64 and search["limited_by"] == "search_to"
        assert [p["seq_len"] for p in search["probes"]] == [32, 64]
    generation = result["generation"]
    assert generation["prompt"] == "validation split" and generation["prompt_bytes"] == 96
    assert generation["time_to_first_byte_s"] > 0 and generation["bytes_per_sec_after_first"] > 0
    assert stdout.strip().splitlines()[-1].startswith("Generation after a 96-byte prompt (validation split")


def test_longest_trainable_doubles_then_bisects_and_stops_before_slow_steps(long_seq):
    longest_trainable = long_seq.longest_trainable

    def probe(seq_len: int) -> dict:  # out of memory above 20,000 bytes; a step takes (T / 4096)^2 s
        if seq_len > 20_000:
            return {"seq_len": seq_len, "status": "out of memory"}
        return {"seq_len": seq_len, "status": "ok", "step_seconds": (seq_len / 4096) ** 2}

    search = longest_trainable(probe, 4096, 2**20, bisections=3, max_step_seconds=1000)
    assert [(p["seq_len"], p["status"]) for p in search["probes"]] == [
        (4096, "ok"), (8192, "ok"), (16384, "ok"), (18432, "ok"), (20480, "out of memory"), (24576, "out of memory"),
        (32768, "out of memory"),
    ]  # fmt: skip
    assert (search["longest_seq_len"], search["limited_by"]) == (18432, "memory")
    search = longest_trainable(probe, 4096, 2**20, bisections=3, max_step_seconds=10)  # 16384 would take 16 s
    assert search["probes"][-1] == {"seq_len": 16384, "status": "not tried", "estimated_step_seconds": 16.0}
    assert (search["longest_seq_len"], search["limited_by"]) == (8192, "time")
    assert longest_trainable(probe, 32768, 2**20, 3, 1000)["longest_seq_len"] is None


def test_short_attention_speed_checks_every_variant(tmp_path, monkeypatch):
    """On the CPU under Triton's interpreter, float32: every variant is timed and computes attention
    (errors against float64 far below float32 rounding of the inputs' scale)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    out = tmp_path / "attention.json"
    stdout = run("short_attention_speed.py", "--N=16", "--L=8", "--heads=2", "--head_dim=16", "--dtype=float32",
                 "--tiles=16,128", "--warps=4", "--reps=2", f"--json={out}")  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["written-out", "SDPA packed", "Triton tile 16 warps 4", "Triton tile 128 warps 4"]
    for r in rows:
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0
        assert r["error_out"] < 1e-6 and r["error_grad"] < 1e-6
    assert stdout.splitlines()[-1].startswith("| Triton tile 128 warps 4 |")


TINY_TRANSFORMER = [
    "--model.arch.init_args.d_model=32", "--model.arch.init_args.n_layers=1", "--model.arch.init_args.n_heads=2",
    *(arg for arg in TINY if not arg.startswith("--model.")),
]  # fmt: skip


def quality_main(*args: str) -> None:
    """benchmarks/quality.py in this process (the tiny runs take seconds; a new interpreter would double that)."""
    quality.cli_main([str(arg) for arg in args])


def compressed(command: list[str], data: bytes) -> bytes:
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout


def xz(data: bytes) -> bytes:
    """Byte for byte what ``xz -9e -T1`` writes (as ``bz2.compress(data, 9)`` is what ``bzip2 -9`` writes)."""
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def test_quality_compressors_compress_the_datamodules_test_split(text_file, tmp_path, monkeypatch, capsys):
    data = text_file.read_bytes()
    n = len(data)
    train, test = data[: n * 8 // 10], data[n * 9 // 10 :]  # split 0.8 / 0.1 / 0.1, by hand
    which = shutil.which
    monkeypatch.setattr(quality.shutil, "which", lambda tool: None if tool == "zstd" else which(tool))
    quality_main("compressors", f"--data={text_file}", f"--out={tmp_path}", "--split", "0.8", "0.1", "0.1",
                 f"--cache_dir={tmp_path / 'cache'}")  # fmt: skip
    results = {c["tool"]: c for c in json.loads((tmp_path / "compressors.json").read_text())}
    assert all(c["test_bytes"] == len(test) for c in results.values())
    expected = {
        "xz": len(xz(test)),
        "xz, training split first": len(xz(train + test)) - len(xz(train)),
        "bzip2": len(bz2.compress(test, 9)),
        "gzip": len(compressed(["gzip", "-9"], test)),
    }
    for tool, size in expected.items():
        assert results[tool]["bits_per_byte"] == 8 * size / len(test), tool
    assert 0 < results["xz, training split first"]["bits_per_byte"] < results["xz"]["bits_per_byte"]
    assert results["zstd"]["bits_per_byte"] is None and results["zstd"]["note"] == "zstd is not installed: skipped"
    printed = capsys.readouterr().out
    assert "zstd (zstd --ultra -22): zstd is not installed: skipped" in printed
    gzip_bpb = 8 * expected["gzip"] / len(test)
    assert f"gzip (gzip -9): {gzip_bpb:.4f} bits per byte on {len(test):,} test bytes" in printed


def bpb_by_hand(lm: MegaByteLM, test: bytes, window: int = 64) -> float:
    """Bits per byte of ``lm``'s model over ``test``, in consecutive windows of ``window`` bytes."""
    with torch.no_grad():
        windows = [torch.tensor(list(test[i : i + window]))[None] for i in range(0, len(test), window)]
        return sum(byte_bits(lm.model(x), x).sum().item() for x in windows) / len(test)


def test_quality_trains_both_models_tests_them_and_tabulates(text_file, tmp_path, capsys):
    out, cache = tmp_path / "results", tmp_path / "cache"
    # 4 optimizer steps, a validation every 2 (the configs' split: 0.96 / 0.02 / 0.02)
    schedule = ["--trainer.max_steps=4", "--trainer.max_time=null", "--trainer.val_check_interval=2",
                "--trainer.limit_val_batches=2", f"--data.path={text_file}", f"--data.cache_dir={cache}"]  # fmt: skip
    quality_main("train", "--config=configs/quickstart.yaml", f"--out={out}", *TINY, *schedule)
    quality_main("train", "--config=configs/transformer-baseline.yaml", f"--out={out}", "--test_checkpoint=best",
                 *TINY_TRANSFORMER, *schedule)  # fmt: skip
    quality_main("compressors", f"--data={text_file}", f"--out={out}", "--split", "0.96", "0.02", "0.02",
                 f"--cache_dir={cache}")  # fmt: skip
    capsys.readouterr()
    megabyte = json.loads((out / "quickstart.json").read_text())  # DIR/<config stem>.json
    transformer = json.loads((out / "transformer-baseline.json").read_text())
    data = text_file.read_bytes()
    test = data[len(data) * 98 // 100 :]

    for r in (megabyte, transformer):
        assert r["steps"] == 4 and r["bytes_seen"] == 4 * 2 * 64  # steps x batch x T
        assert [(p["step"], p["bytes"]) for p in r["val_curve"]] == [(1, 2 * 2 * 64), (3, 4 * 2 * 64)]
        seconds = [p["seconds"] for p in r["val_curve"]]
        assert 0 < seconds[0] < seconds[1] < r["fit_seconds"] and all(0 < p["bpb"] < 9 for p in r["val_curve"])
        assert r["test_bytes"] == len(test) and r["test_seconds"] > 0 and r["peak_memory_gib"] is None
    assert (megabyte["model"], transformer["model"]) == ("MegaByte", "ByteTransformer")
    assert megabyte["seed"] == transformer["seed"] == 0  # the configs' seed_everything
    # MegaByte is tested at its last checkpoint; the transformer (--test_checkpoint best) at its lowest val bpb.
    assert megabyte["tested_checkpoint"] == "last" and megabyte["checkpoint_step"] == 4
    best = min(transformer["val_curve"], key=lambda p: p["bpb"])
    assert transformer["tested_checkpoint"] == "best" and transformer["checkpoint_step"] == best["step"] + 1
    assert Path(transformer["checkpoint"]).name.startswith(f"best-step{best['step'] + 1}-")
    best_lm = MegaByteLM.load_from_checkpoint(transformer["checkpoint"], map_location="cpu").eval()
    assert transformer["test_bpb"] == pytest.approx(bpb_by_hand(best_lm, test), rel=1e-6)
    assert 0 < transformer["test_bpb"] < 9 and transformer["strided_test_bpb"] is None

    # Test bpb is exact over the whole test split, of the checkpoint the fit wrote last: a pass by hand.
    lm = MegaByteLM.load_from_checkpoint(megabyte["checkpoint"], map_location="cpu").eval()
    assert megabyte["test_bpb"] == pytest.approx(bpb_by_hand(lm, test), rel=1e-6)
    strided = megabyte["strided_test_bpb"]
    assert 0 < strided < 9 and strided != pytest.approx(megabyte["test_bpb"], rel=1e-5)
    assert megabyte["strided_test_seconds"] > 0
    # Where in its patches the model spends its bits: predict's bits of the same split, by position.
    bits = np.load(out / "quickstart_test_bits.npy")
    assert bits.shape == (len(test),) and bits.mean(dtype=np.float64) == pytest.approx(megabyte["test_bpb"], rel=1e-5)
    P = lm.config.patch_size
    assert megabyte["test_bpb_by_patch_position"] == pytest.approx([bits[p::P].mean() for p in range(P)], rel=1e-5)
    assert transformer["test_bpb_by_patch_position"] is None
    assert megabyte["training_flops_per_byte"] == training_flops_per_byte(lm.config, 64)
    assert megabyte["parameters"] == sum(p.numel() for p in lm.model.parameters())
    compressors = {c["tool"]: c for c in json.loads((out / "compressors.json").read_text())}
    if shutil.which("zstd"):  # the other tools: test_quality_compressors_compress_the_datamodules_test_split
        zstd = compressed(["zstd", "--ultra", "-22"], test)
        assert compressors["zstd"]["bits_per_byte"] == 8 * len(zstd) / len(test)

    quality_main("table", out)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| ")]
    names = [row[:2] for row in rows[1:3]]
    assert names == [["| quickstart", "MegaByte"], ["| transformer-baseline", "ByteTransformer"]]
    assert rows[1][4:6] == ["4", "512"] and rows[1][8:10] == [f"{megabyte['test_bpb']:.4f}", f"{strided:.4f}"]
    assert len(rows) == 1 + 2 + 5 and all(row[1] == "compressor" for row in rows[3:])
    assert rows[4][0] == "| `xz -9e -T1` given the training split"
    assert f"- test split: {len(test):,} bytes, the same for every row that records it" in lines
    assert (out / "val_bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_runs_a_row_once_per_seed_and_tabulates_the_spread(tmp_path, monkeypatch, capsys):
    """--seed 3 5: two runs of the row, seeded by --seed_everything, each JSON in --out and in --results;
    the table's notes give their mean and spread."""
    calls = []

    def fake_train(config, out, name, overrides, test_checkpoint):
        calls.append((name, overrides))
        seed = int(overrides[-1].rpartition("=")[2])
        return {"name": name, "model": "MegaByte", "parameters": 1, "training_flops_per_byte": 1.0, "steps": 1,
                "bytes_seen": 1, "fit_seconds": 1.0, "test_bpb": 0.75 + seed / 100, "strided_test_bpb": 0.7,
                "test_seconds": 1.0, "strided_test_seconds": 1.0, "val_curve": [{"bytes": 1, "seconds": 1.0, "bpb": 0.8}],
                "device": "cpu", "precision": "32", "batch": 1, "seq_len": 8, "checkpoint_step": 1,
                "date": "today", "peak_memory_gib": None, "test_bytes": 10}  # fmt: skip

    monkeypatch.setattr(quality, "train", fake_train)
    out, results = tmp_path / "out", tmp_path / "results"
    quality_main("train", "--config=configs/quickstart.yaml", f"--out={out}", "--seed", "3", "5",
                 f"--results={results}", "--data.path=x.txt")  # fmt: skip
    assert calls == [("quickstart-seed3", ["--data.path=x.txt", "--seed_everything=3"]),
                     ("quickstart-seed5", ["--data.path=x.txt", "--seed_everything=5"])]  # fmt: skip
    for folder in (out, results):
        assert sorted(p.name for p in folder.glob("*.json")) == ["quickstart-seed3.json", "quickstart-seed5.json"]
    capsys.readouterr()
    quality_main("table", out)
    lines = capsys.readouterr().out.splitlines()
    assert ("- quickstart over seeds 3, 5: test bpb 0.7900 +- 0.0141 (0.7800..0.8000); strided 0.7000 +- 0.0000 "
            "(0.7000..0.7000)") in lines  # fmt: skip


def test_quality_counts_the_bytes_of_every_modalitys_test_split(text_file, tmp_path):
    """Text and audio splits are byte streams, an image split is images of seq_len bytes each."""
    folder = write_image_folder(tmp_path / "images", n=12, size=8)
    test_folder = write_image_folder(tmp_path / "test_images", n=5, size=8, seed=1)
    images = ImageDataModule(str(folder), test_path=str(test_folder), image_size=8, channels=3, num_workers=0,
                             cache_dir=str(tmp_path / "cache"))  # fmt: skip
    text = TextDataModule(str(text_file), seq_len=16, split=(0.8, 0.1, 0.1), num_workers=0, cache_dir=str(tmp_path / "cache"))
    for datamodule in (images, text):
        datamodule.prepare_data()
        datamodule.setup("fit")
    assert quality.split_bytes(images, "test") == 5 * 8 * 8 * 3
    n = len(text_file.read_bytes())
    assert quality.split_bytes(text, "test") == n - n * 9 // 10


def test_quality_table_notes_test_splits_of_unknown_size_without_a_false_warning():
    def run(name: str, test_bytes: int | None) -> dict:
        return {"name": name, "test_bytes": test_bytes, "peak_memory_gib": None, "device": "cpu", "precision": "32",
                "batch": 2, "seq_len": 8, "checkpoint_step": 4, "date": "today"}  # fmt: skip

    lines = quality.notes([run("a", 100), run("b", None), run("c", 100)], [])
    assert "- test split size not recorded: b" in lines
    assert "- test split: 100 bytes, the same for every row that records it" in lines
    assert not any("WARNING" in line for line in quality.notes([run("a", None), run("b", None)], []))
    assert "- WARNING: the rows' test splits differ ([100, 200] bytes)" in quality.notes([run("a", 100), run("b", 200)], [])


def test_quality_compressors_of_an_image_config_add_png(tmp_path, capsys):
    """--config takes any modality's data block; images also get PNG, a file per test image."""
    train_folder = write_image_folder(tmp_path / "images", n=12, size=8)
    test_folder = write_image_folder(tmp_path / "test_images", n=4, size=8, seed=1)
    quality_main("compressors", "--config=configs/bench/quality/image-megabyte.yaml", f"--out={tmp_path}",
                 f"--data.path={train_folder}", f"--data.test_path={test_folder}", "--data.image_size=8",
                 f"--data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    results = {c["tool"]: c for c in json.loads((tmp_path / "compressors.json").read_text())}
    files = sorted(test_folder.rglob("*.png"))
    # The test split by hand: each image in the 2 x 2 patch scan, in the folder's order.
    test = b"".join(image_to_bytes(torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1), "patch", 2).tobytes()
                    for f in files)  # fmt: skip
    assert len(test) == 4 * 8 * 8 * 3 and all(c["test_bytes"] == len(test) for c in results.values())
    assert results["xz"]["bits_per_byte"] == 8 * len(xz(test)) / len(test)
    png = 0
    for f in files:
        buffer = io.BytesIO()
        Image.open(f).save(buffer, "PNG", optimize=True)
        png += len(buffer.getvalue())
    assert results["PNG"]["compressed_bytes"] == png and results["PNG"]["bits_per_byte"] == 8 * png / len(test)
    assert "PNG (Pillow PNG -9, a file per image):" in capsys.readouterr().out


def test_quality_compressors_of_an_audio_config_add_flac(tmp_path):
    """Audio also gets FLAC, a file per test recording (FSDD's official split: indices 0-4)."""
    folder = write_wav_folder(tmp_path / "audio", n=12)
    quality_main("compressors", "--config=configs/bench/quality/audio-megabyte.yaml", f"--out={tmp_path}",
                 f"--data.path={folder}", "--data.seq_len=64", f"--data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    results = {c["tool"]: c for c in json.loads((tmp_path / "compressors.json").read_text())}
    files = sorted(f for f in folder.iterdir() if re.search(FSDD_TEST_PATTERN, f.name))
    samples = [soundfile.read(f, dtype="int16")[0] for f in files]
    test = b"".join(s.astype("<i2").tobytes() for s in samples)
    assert len(files) == 2 and len(test) == 8000 and all(c["test_bytes"] == 8000 for c in results.values())
    assert results["gzip"]["bits_per_byte"] == 8 * len(compressed(["gzip", "-9"], test)) / len(test)
    flac = 0
    for s in samples:
        buffer = io.BytesIO()
        soundfile.write(buffer, s, 8000, format="FLAC", subtype="PCM_16")
        flac += len(buffer.getvalue())
    assert results["FLAC"]["compressed_bytes"] == flac and 0 < results["FLAC"]["bits_per_byte"] < 8


def test_quality_compressors_take_a_corpus_or_a_config(tmp_path, capsys):
    for args in ([], ["--data=x.txt", "--config=configs/quickstart.yaml"]):
        with pytest.raises(SystemExit):
            quality_main("compressors", f"--out={tmp_path}", *args)
        assert "compressors takes --data FILE (a text corpus) or --config CONFIG" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --data.* arguments go with --config only
        quality_main("compressors", f"--out={tmp_path}", "--data=x.txt", "--data.seq_len=8")
    assert "unrecognized arguments: --data.seq_len=8" in capsys.readouterr().err
    for text_only in (["--split", "0.8", "0.1", "0.1"], ["--cache_dir=c"]):  # --config takes --data.* instead
        with pytest.raises(SystemExit):
            quality_main("compressors", f"--out={tmp_path}", "--config=configs/quickstart.yaml", *text_only)
        assert "--split and --cache_dir go with --data: with --config, give --data.split and --data.cache_dir" in capsys.readouterr().err


def test_compress_speed_round_trips_files_and_the_test_split_and_reports_sizes(text_file, tmp_path):
    torch.manual_seed(0)
    data = {"class_path": "datamodules.TextDataModule", "init_args": {"path": str(text_file), "seq_len": 64, "split": [0.8, 0.1, 0.1]}}
    folder = Pretrained(MegaByte(MegaByteConfig(max_seq_len=64, d_global=32, n_global_heads=2, n_global_layers=1, d_local=16,
                                                n_local_heads=2, n_local_layers=1)), data).export(tmp_path / "model")  # fmt: skip
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(range(256)) * 2)
    out, split_file = tmp_path / "compress.json", tmp_path / "test-split.bin"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # this checkout's modules
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compress_speed.py"), "--ckpt_path", str(folder), str(small),
         "--test_split_of", str(text_file), "--cache_dir", str(tmp_path / "cache"), "--write_split", str(split_file),
         "--batch_size", "8", "--chunk_len", "32", "--device", "cpu", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = text_file.read_bytes()
    assert split_file.read_bytes() == text[len(text) * 9 // 10 :]  # the checkpoint's split [0.8, 0.1, 0.1], by hand
    report = json.loads(out.read_text())
    assert report["model"] == "MegaByte" and report["device"] == "cpu"
    files, split = report["results"]
    assert files["bytes"] == 512 and split["bytes"] == len(split_file.read_bytes())
    for r in (files, split):
        assert r["bit_exact"] and r["mode"] == "raw" and r["chunk_len"] == 32 and r["batch_size"] == 8
        assert r["bits_per_byte"] == 8 * r["compressed_bytes"] / r["bytes"]
        assert r["size_over_model_bits"] == pytest.approx(r["compressed_bytes"] / (r["model_bits_per_byte"] * r["bytes"] / 8))
        assert r["compress_bytes_per_s"] > 0 and r["decompress_bytes_per_s"] > 0
        tools = {c["tool"]: c for c in r["compressors"]}
        assert set(tools) == {"xz", "zstd", "bzip2", "gzip"}
        for name, c in tools.items():
            if shutil.which(name):
                assert c["bits_per_byte"] == 8 * c["compressed_bytes"] / r["bytes"]
            else:
                assert c["note"] == f"{name} is not installed: skipped"
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("MegaByte (") and len(lines) == 1 + 2 + 2  # the title, the table's head, two rows
