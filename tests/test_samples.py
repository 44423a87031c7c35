"""Samples: the TensorBoard callback writes events in each medium, and ``cli.py generate`` writes files."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.samples import SampleCallback, as_code_block
from cli import main
from datamodules import TextDataModule
from megabyte import MegaByteLM
from tests.conftest import REPO, tiny_megabyte_config


def events(log_dir: Path) -> EventAccumulator:
    (event_file,) = log_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file.parent), size_guidance={"tensors": 0, "images": 0, "audio": 0})
    accumulator.Reload()
    return accumulator


def fit_with_samples(datamodule: L.LightningDataModule, tmp_path: Path, callback: SampleCallback) -> EventAccumulator:
    torch.manual_seed(0)
    model = MegaByteLM(tiny_megabyte_config(max_seq_len=datamodule.seq_len), warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1,
        logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule)
    return events(tmp_path / "run")


def text_summaries(accumulator: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in accumulator.Tensors(tag)]


def test_text_samples_are_logged_as_code_blocks_every_n_validations(text_file, tmp_path):
    datamodule = TextDataModule(str(text_file), seq_len=32, batch_size=2, num_workers=0, cache_dir=str(tmp_path))
    callback = SampleCallback(every_n_validations=2, n_samples=2, sample_len=24, prompt_fraction=0.5)
    accumulator = fit_with_samples(datamodule, tmp_path, callback)
    tags = accumulator.Tags()["tensors"]
    assert sorted(tags) == ["samples/text/0/text_summary", "samples/text/1/text_summary"]
    # two validations (steps 2 and 4) after the sanity check: samples after the second only
    ((step, text),) = text_summaries(accumulator, "samples/text/0/text_summary")
    assert step == 4
    prompt = datamodule.examples(2)[0][:12]  # the first 12 bytes of a validation window
    assert as_code_block(datamodule.decode(prompt)) in text
    assert text.startswith("**prompt**") and "**continuation**" in text


def test_code_block_keeps_whitespace_and_backticks():
    assert as_code_block("a\n  b```\n") == "    a\n      b```\n    "


def test_sample_callback_rejects_bad_options():
    with pytest.raises(ValueError, match="every_n_validations >= 0"):
        SampleCallback(every_n_validations=-1)
    with pytest.raises(ValueError, match="n_samples >= 1"):
        SampleCallback(n_samples=0)


def fit_quickstart(text_file: Path, tmp_path: Path) -> Path:
    main([
        "fit", f"--config={REPO / 'configs' / 'quickstart.yaml'}",
        "--model.arch.init_args.d_global=32", "--model.arch.init_args.n_global_heads=2",
        "--model.arch.init_args.d_local=16", "--model.arch.init_args.n_local_heads=2",
        f"--data.path={text_file}", "--data.seq_len=32", "--data.batch_size=2", "--data.num_workers=0",
        f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.accelerator=cpu", "--trainer.max_steps=2",
        "--trainer.max_time=null", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ])  # fmt: skip
    (last,) = (tmp_path / "logs").rglob("last.ckpt")
    return last


def test_generate_from_a_checkpoint_writes_files(text_file, tmp_path, monkeypatch):
    last = fit_quickstart(text_file, tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "samples"
    args = ["generate", f"--ckpt_path={last}", f"--output_dir={out}", "--trainer.accelerator=cpu"]
    main([*args, "--n_samples=3", "--temperature=0"])
    assert sorted(p.name for p in out.iterdir()) == [
        *(f"original_{i}.txt" for i in range(3)), *(f"sample_{i}.txt" for i in range(3))
    ]  # fmt: skip
    for i in range(3):
        sample, original = (out / f"sample_{i}.txt").read_bytes(), (out / f"original_{i}.txt").read_bytes()
        assert len(sample) == len(original) == 32 and sample[:16] == original[:16]

    # Greedy bytes from the command line are exactly the model's greedy continuation of the prompt file.
    (tmp_path / "prompt.txt").write_bytes(b"def main(")
    main([*args, f"--prompt_file={tmp_path / 'prompt.txt'}", "--n_samples=1", "--temperature=0", "--sample_len=30"])
    lm = MegaByteLM.load_from_checkpoint(last, map_location="cpu")
    prompt = torch.tensor([list(b"def main(")])
    expected = lm.model.generate(prompt, 21, temperature=0)[0]
    assert np.array_equal(np.frombuffer((out / "sample_0.txt").read_bytes(), dtype=np.uint8), expected.numpy())

    with pytest.raises(ValueError, match="use a shorter prompt or a larger --sample_len"):
        main([*args, f"--prompt_file={tmp_path / 'prompt.txt'}", "--sample_len=9"])
