"""The benchmark scripts run on the CPU with a tiny config, so CI keeps them working (no timing is checked)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

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
    assert result["short_attention"] == "kernel"
    assert stdout.splitlines()[-1].startswith("| MegaByte | config-m.yaml")


def test_generate_speed_prints_rows_and_writes_json(tmp_path):
    out = tmp_path / "generate.jsonl"
    stdout = run("generate_speed.py", "--config=configs/bench/config-m.yaml", "--batch_sizes", "1", "3",
                 "--new_bytes=40", "--prompt_bytes=5", f"--json={out}", *TINY)  # fmt: skip
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch"] for r in results] == [1, 3] and all(r["new_bytes"] == 40 for r in results)
    for r in results:
        assert r["bytes_per_sec"] > 0 and r["bytes_per_sec"] == pytest.approx(r["batch"] * r["bytes_per_sec_per_sequence"])
    assert len(stdout.strip().splitlines()) == 4  # header, separator, two rows


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
