"""What the CLI prints and where it writes: one line per validation without a progress bar, none of
Lightning's messages that do not concern a user, ``hp_metric`` the best val bpb, and an evaluation or
generation from a checkpoint beside that checkpoint's run (never over its files)."""

import subprocess
import sys

import numpy as np
import torch

from cli import main
from tests.conftest import REPO
from tests.test_bad_input import QUICKSTART
from tests.test_cli import scalars, tiny_args

NOT_FOR_USERS = ("💡", "litlogger", "litmodels", "Total Flops", "LeafSpec", "No seed found", "dirpath has changed",
                 "['Timer']", "weights_only")  # fmt: skip


def cli(*args: str, cwd) -> str:
    """``python cli.py ARGS`` in its own process (what a user sees: warnings included) -> stdout + stderr."""
    done = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_fit_then_test_predict_generate_print_what_concerns_the_user_and_write_beside_the_run(text_file, tmp_path):
    fit = ["fit", *tiny_args(QUICKSTART, text_file, tmp_path), "--trainer.enable_model_summary=true",
           "--trainer.max_steps=6", "--trainer.max_time=00:00:10:00", "--trainer.val_check_interval=2",
           "--trainer.limit_val_batches=2", "--samples.every_n_validations=0", "--seed_everything=true"]  # fmt: skip
    out = cli(*fit, cwd=tmp_path)
    assert not [m for m in NOT_FOR_USERS if m in out], out
    assert "Total params" in out  # the model summary itself stays
    reported = [line for line in out.splitlines() if line.startswith("step ")]
    run = tmp_path / "logs" / "quickstart" / "version_0"
    val_bpb = scalars(run)["val/bpb"]
    assert reported == [f"step {2 * (i + 1)}: val/bpb {v:.4f} (best {min(val_bpb[: i + 1]):.4f})" for i, v in enumerate(val_bpb)]
    hp_metric = scalars(run)["hp_metric"]
    assert hp_metric[0] == -1 and hp_metric[1:] == [min(val_bpb[: i + 1]) for i in range(len(val_bpb))]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["callbacks"]["ValidationReport"]["best"] == min(val_bpb)

    run_files = {p: p.read_bytes() for p in run.iterdir() if p.is_file()}
    out = cli("test", f"--ckpt_path={last}", "--trainer.enable_progress_bar=false", cwd=tmp_path)
    assert not [m for m in NOT_FOR_USERS if m in out], out
    assert "test/bpb" in out
    assert "test/bpb" in scalars(run / "test")
    main(["predict", f"--ckpt_path={last}", "--trainer.enable_progress_bar=false"])
    bits = np.load(run / "predict" / "predict_bits.npy")
    assert bits.ndim == 1 and len(bits) > 0
    main(["generate", f"--ckpt_path={last}", "--sample_len=24", "--n_samples=1"])
    assert len((run / "samples" / "sample_0.txt").read_bytes()) == 24

    assert sorted(p.name for p in (tmp_path / "logs" / "quickstart").iterdir()) == ["version_0"]  # no new runs
    assert {p: p.read_bytes() for p in run.iterdir() if p.is_file()} == run_files  # the run's own files untouched


def test_a_resumed_run_keeps_its_best_for_hp_metric(text_file, tmp_path):
    fit = ["fit", *tiny_args(QUICKSTART, text_file, tmp_path), "--trainer.max_time=null", "--trainer.val_check_interval=2",
           "--trainer.limit_val_batches=2", "--samples.every_n_validations=0", "--trainer.logger.init_args.version=0"]  # fmt: skip
    main([*fit, "--trainer.max_steps=4"])
    main([*fit, "--trainer.max_steps=6", "--ckpt_path=last"])
    run = tmp_path / "logs" / "quickstart" / "version_0"
    val_bpb, hp_metric = scalars(run)["val/bpb"], scalars(run)["hp_metric"]
    assert len(val_bpb) == 3
    assert hp_metric[-1] == min(val_bpb)
