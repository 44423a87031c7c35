"""Interrupted training: exact resume (data order, learning rate, optimizer), SIGTERM and SIGKILL,
atomic checkpoint files, and a stop at a non-finite loss."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.checkpoint import ModelCheckpoint
from callbacks.fault_tolerance import AtomicCheckpointIO
from cli import main
from datamodules import TextDataModule
from datamodules.windows import ResumableSampler
from megabyte import MegaByteLM
from tests.conftest import REPO, tiny_megabyte_config, tiny_transformer_config

TINY_ARCH = dict(d_global=32, n_global_layers=1, n_global_heads=2, d_local=16, n_local_layers=1, n_local_heads=2, patch_size=4)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """1200 bytes: 960 of training, 30 windows of 32 bytes, 7 batches of 4 per epoch."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_bytes(Path(os.__file__).read_bytes()[:1200])
    return path


@pytest.fixture(scope="module")
def uninterrupted_run(small_corpus, tmp_path_factory) -> Path:
    """The log folder of 16 steps without interruption (two epochs and a bit)."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    main(fit_args(small_corpus, tmp_path, "full", 16))
    return tmp_path / "full"


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[int, float]:
    """{step: train/loss} of the uninterrupted run."""
    return losses(uninterrupted_run)


def fit_args(corpus: Path, tmp_path: Path, run: str, max_steps: int) -> list[str]:
    return [
        "fit", f"--config={REPO / 'configs' / 'quickstart.yaml'}",
        *(f"--model.arch.init_args.{k}={v}" for k, v in TINY_ARCH.items()),
        "--model.warmup_steps=4",
        f"--data.path={corpus}", "--data.seq_len=32", "--data.batch_size=4", "--data.split=[0.8, 0.1, 0.1]",
        "--data.num_workers=0", f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / run}", f"--trainer.max_steps={max_steps}",
        "--trainer.max_time=null", "--trainer.val_check_interval=5", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0", "--checkpoint.every_n_train_steps=3",
        "--samples.every_n_validations=0",
    ]  # fmt: skip


def run_cli(args: list[str], callbacks: list[dict] | None = None, tmp_path: Path | None = None) -> subprocess.CompletedProcess:
    if callbacks:
        extra = tmp_path / "callbacks.yaml"
        extra.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
        args = [*args, f"--config={extra}"]
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def losses(log_dir: Path) -> dict[int, float]:
    """{step: train/loss} of every TensorBoard event file under ``log_dir``."""
    out = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            out.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    return out


def test_resumed_run_continues_exactly(small_corpus, uninterrupted, tmp_path):
    # Killed (SIGKILL) after the checkpoint of step 9, in the middle of the second epoch
    kill = [{"class_path": "tests.fault_helpers.SignalAtStep", "init_args": {"step": 9, "signal_name": "SIGKILL"}}]
    killed = run_cli(fit_args(small_corpus, tmp_path, "killed", 16), kill, tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (last,) = (tmp_path / "killed").rglob("last.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 9
    assert checkpoint["TextDataModule"] == {"train_epoch": 1, "train_samples": 2 * 4}  # 2 batches of 4 windows

    main([*fit_args(small_corpus, tmp_path, "resumed", 16), f"--ckpt_path={last}"])
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(9, 16))
    assert resumed == {s: uninterrupted[s] for s in resumed}  # exact: same data, learning rate and optimizer state


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(small_corpus, uninterrupted, tmp_path):
    term = [{"class_path": "tests.fault_helpers.SignalAtStep", "init_args": {"step": 6, "signal_name": "SIGTERM"}}]
    args = [*fit_args(small_corpus, tmp_path, "term", 16), "--checkpoint.every_n_train_steps=1000"]
    terminated = run_cli(args, term, tmp_path)
    assert terminated.returncode == 128 + signal.SIGTERM, terminated.stderr[-3000:]
    (last,) = (tmp_path / "term").rglob("last.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    # Lightning finishes the step under way (the 7th), then stops before the next one
    assert checkpoint["global_step"] == 7 and checkpoint["TextDataModule"] == {"train_epoch": 1, "train_samples": 0}
    main([*fit_args(small_corpus, tmp_path, "after", 16), f"--ckpt_path={last}"])
    after = losses(tmp_path / "after")
    assert sorted(after) == list(range(7, 16))
    assert after == {s: uninterrupted[s] for s in after}


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(small_corpus, tmp_path):
    args = fit_args(small_corpus, tmp_path, "nan", 20)
    args += [
        "--trainer.callbacks+=tests.fault_helpers.NanWeightsAtStep", "--trainer.callbacks.step=7",
        "--checkpoint.every_n_train_steps=2",
    ]  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"training loss is nan or inf at step 7 .*last\.ckpt"):
        main(args)
    (last,) = (tmp_path / "nan").rglob("last.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 6
    assert all(torch.isfinite(w).all() for w in checkpoint["state_dict"].values())


def test_atomic_save_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def interrupted_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_resumable_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = ResumableSampler(10, 8, seed=3, replacement=False)
    first, second = list(sampler), list(sampler)
    assert first != second and sorted(set(first)) == sorted(first)
    resumed = ResumableSampler(10, 8, seed=3, replacement=False, epoch=1, start=5)
    assert list(resumed) == second[5:] and len(resumed) == 8
    assert list(resumed) == list(ResumableSampler(10, 8, seed=3, replacement=False, epoch=2))
    with_replacement = ResumableSampler(5, 50, seed=0, replacement=True)
    assert np.isin(list(with_replacement), range(5)).all()


@pytest.mark.parametrize(
    "arch, message",
    [
        (tiny_megabyte_config(max_seq_len=32, **{**TINY_ARCH, "d_global": 64}), r"d_global 32 \(checkpoint\) vs 64 \(configured\)"),
        (tiny_transformer_config(max_seq_len=32), r"arch.class_path megabyte.MegaByteConfig \(checkpoint\) vs megabyte.ByteTransformerConfig"),
    ],
)
def test_checkpoint_of_another_architecture_gives_one_clear_error(uninterrupted_run, arch, message):
    """(The CLI rebuilds the model from a checkpoint's hyperparameters; this is for ``trainer.test(model,
    ckpt_path=...)`` with a model built otherwise.)"""
    (last,) = uninterrupted_run.rglob("last.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=message):
        trainer.validate(MegaByteLM(arch), [(torch.zeros(1, 32, dtype=torch.uint8), torch.ones(1, 32, dtype=torch.bool))], ckpt_path=last)
    model = MegaByteLM(tiny_megabyte_config(max_seq_len=32, **TINY_ARCH))
    model.on_load_checkpoint(checkpoint)  # the same architecture loads
    model.load_state_dict(checkpoint["state_dict"])


class NanLossOnce(L.Callback):
    """The model's logits are NaN for the batch of one training step only."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.weights = {}  # global step -> a copy of the weights before it

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]
        forward = pl_module.model.forward
        if trainer.global_step == self.step and "forward" not in vars(pl_module.model):
            pl_module.model.forward = lambda x: forward(x) * float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        vars(pl_module.model).pop("forward", None)


def test_skip_nonfinite_skips_the_step_and_trains_on(text_file, tmp_path):
    datamodule = TextDataModule(str(text_file), seq_len=32, batch_size=2, num_workers=0, cache_dir=str(tmp_path))
    model = MegaByteLM(tiny_megabyte_config(max_seq_len=32), warmup_steps=1, skip_nonfinite=True)
    nan_once = NanLossOnce(step=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
        callbacks=[nan_once], enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="skipped a training step with loss nan"):
        trainer.fit(model, datamodule)
    w = nan_once.weights
    assert all(torch.equal(a, b) for a, b in zip(w[2], w[3]))  # the NaN step changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(w[3], w[4]))  # the next one trained
    assert all(torch.isfinite(p).all() for p in model.parameters())


class WorseEachValidation(L.LightningModule):
    """A one-weight model whose logged val/bpb grows with every validation: none after the first improves."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/bpb", float(self.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_is_the_latest_state_when_validation_does_not_improve_and_at_the_end(tmp_path):
    # Lightning 2.6 writes last.ckpt only when a top-k checkpoint is saved at the same step.
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 1)), batch_size=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/bpb", save_top_k=1, save_last=True, filename="best")
    trainer = L.Trainer(max_steps=7, val_check_interval=2, callbacks=[checkpoint], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(WorseEachValidation(), data, data)
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["global_step"] == 2  # the best val/bpb
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    # Validations at steps 2, 4 and 6; the 7th step comes after the last one and is kept too.
    assert last["global_step"] == 7 and last["state_dict"]["weight"].item() == pytest.approx(1 - 0.1 * 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
