"""Every YAML in configs/ trains a few steps through the CLI (tiny overrides), then tests its checkpoint."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli import main, read_checkpoint
from megabyte.parallelize import checkpointed_stacks, local_chunk_patches
from tests.audio_files import write_wav_folder
from tests.conftest import REPO
from tests.image_files import write_image_folder

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))



def tiny_arch(arch: dict) -> dict:
    if arch["class_path"] == "megabyte.ByteTransformerConfig":
        return {"d_model": 32, "n_layers": 1, "n_heads": 2}
    # d_global must stay a multiple of the config's patch size, and at least d_local
    P = arch["init_args"]["patch_size"]
    return {"d_global": P * max(4, -(-16 // P)), "n_global_layers": 1, "n_global_heads": 2,
            "d_local": 16, "n_local_layers": 1, "n_local_heads": 2}  # fmt: skip


def tiny_data(data: dict, text_file: Path, tmp_path: Path) -> list[str]:
    """Small real media of the config's modality (``data``: its data block), and a sequence length to match."""
    data_class = data["class_path"]
    if data_class == "datamodules.ImageDataModule":
        images = [f"--data.path={write_image_folder(tmp_path / 'images', n=12)}", "--data.image_size=8"]
        if data.get("init_args", {}).get("test_path"):  # a test set of its own, as cifar10-test.tar.gz
            images.append(f"--data.test_path={write_image_folder(tmp_path / 'test_images', n=4, seed=1)}")
        return images
    if data_class == "datamodules.AudioDataModule":
        return [f"--data.path={write_wav_folder(tmp_path / 'audio', n=12)}", "--data.seq_len=64"]
    return [f"--data.path={text_file}", "--data.seq_len=32"]


def cpu_trainer_args(tmp_path: Path) -> list[str]:
    # One process: configs/distributed/ choose DDP or FSDP (FSDP needs GPUs; tests/test_distributed.py
    # runs DDP on 2 CPU processes).
    return [
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]  # fmt: skip


def tiny_args(config: Path, text_file: Path, tmp_path: Path) -> list[str]:
    parsed = yaml.safe_load(config.read_text())
    return [
        f"--config={config}",
        *(f"--model.arch.init_args.{k}={v}" for k, v in tiny_arch(parsed["model"]["arch"]).items()),
        *tiny_data(parsed["data"], text_file, tmp_path),
        "--data.batch_size=2", "--data.num_workers=0", f"--data.cache_dir={tmp_path / 'cache'}",
        *cpu_trainer_args(tmp_path),
    ]  # fmt: skip


def scalars(log_dir: Path) -> dict[str, list[float]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def fit(config: Path, text_file: Path, tmp_path: Path) -> Path:
    main(["fit", *tiny_args(config, text_file, tmp_path), "--trainer.max_steps=4", "--trainer.max_time=null",
          "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1"])  # fmt: skip
    (last,) = (tmp_path / "logs").rglob("last.ckpt")
    return last


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_fits_then_tests_from_its_checkpoint(config, text_file, tmp_path):
    last = fit(config, text_file, tmp_path)
    checkpoint = torch.load(last, weights_only=True)  # plain data only: no pickled objects
    assert checkpoint["datamodule_hyper_parameters"] and checkpoint["hyper_parameters"]["arch"]["class_path"]
    run_dir = last.parent.parent
    assert any(p.name.startswith("best-") for p in last.parent.iterdir())  # best val/bpb is kept too
    logged = scalars(run_dir)
    for tag in ("train/loss", "train/bpb", "val/bpb", "train/lr/decay"):
        assert tag in logged, f"{tag} not in TensorBoard events: {sorted(logged)}"
    assert len(logged["train/loss"]) == 4 and len(logged["val/bpb"]) == 2
    assert all(0 < v < 9 for v in logged["val/bpb"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # the whole run's configuration, re-runnable
    assert saved["trainer"]["max_steps"] == 4
    assert saved["data"]["init_args"]["path"] == checkpoint["datamodule_hyper_parameters"]["path"]
    arch = checkpoint["hyper_parameters"]["arch"]  # max_seq_len is not in the file: data.seq_len sets it
    assert saved["model"]["arch"] == {**arch, "init_args": {k: v for k, v in arch["init_args"].items() if k != "max_seq_len"}}

    cli = main(["test", *tiny_args(config, text_file, tmp_path), f"--ckpt_path={last}", "--trainer.max_time=null"])
    test_bpb = cli.trainer.callback_metrics["test/bpb"].item()
    assert 0 < test_bpb < 9
    assert "test/bpb" in scalars(run_dir / "test")  # logged beside the run that wrote the checkpoint


def test_checkpoint_alone_rebuilds_model_and_data(text_file, tmp_path, monkeypatch, capsys):
    last = fit(REPO / "configs" / "quickstart.yaml", text_file, tmp_path)
    monkeypatch.chdir(tmp_path)
    quiet = "--trainer.enable_progress_bar=false"
    # No --config: the architecture, seq_len and data come from the checkpoint.
    cli = main(["test", f"--ckpt_path={last}", quiet])
    assert cli.model.config.d_global == 32 and cli.model.config.max_seq_len == 32
    assert cli.datamodule.path == str(text_file)
    # Strided inference is an evaluation option: it can be switched on for a trained checkpoint.
    strided = main(["test", f"--ckpt_path={last}", quiet, "--model.strided_eval=true"])
    assert strided.model.hparams.strided_eval and not cli.model.hparams.strided_eval
    plain_bpb, strided_bpb = (c.trainer.callback_metrics["test/bpb"].item() for c in (cli, strided))
    assert 0 < strided_bpb < 9 and strided_bpb != pytest.approx(plain_bpb, rel=1e-4)
    validated = main(["validate", f"--ckpt_path={last}", quiet])
    assert validated.trainer.callback_metrics["val/bpb"].item() > 0
    predicted = main(["predict", f"--ckpt_path={last}", quiet, "--trainer.limit_predict_batches=2",
                      f"--predictions.path={tmp_path / 'bits.npy'}"])  # fmt: skip
    batches = predicted.trainer.predict_loop.predictions
    assert batches[0]["bits"].shape == (2, 32)
    # The file holds the bits of every byte predicted, in the split's order: here 2 batches of 2 full windows.
    written = np.load(tmp_path / "bits.npy")
    assert written.dtype == np.float32 and written.shape == (4 * 32,)
    assert np.array_equal(written, torch.cat([b["bits"].reshape(-1) for b in batches]).numpy())

    # Windows shorter than the model's: the model stays the checkpoint's. The bits go by default to the
    # run's log folder, for the whole split: each of its bytes once, its short last window too.
    default = main(["predict", f"--ckpt_path={last}", quiet, "--data.seq_len=24"])
    assert default.model.config.max_seq_len == 32 and default.datamodule.seq_len == 24
    written, split = np.load(Path(default.trainer.log_dir) / "predict_bits.npy"), default.datamodule.splits["test"]
    assert len(split) % 24 and written.shape == (len(split),)
    mean_bits = torch.cat([b["bits"][b["mask"]] for b in default.trainer.predict_loop.predictions]).double().mean()
    assert written.mean(dtype=np.float64) == pytest.approx(mean_bits.item())
    # A config file's ckpt_path counts like --ckpt_path.
    (tmp_path / "test.yaml").write_text(f"ckpt_path: {last}\n")
    assert main(["validate", f"--config={tmp_path / 'test.yaml'}", quiet]).model.config.max_seq_len == 32

    for args, message in [
        ([f"--ckpt_path={last}", "--data.seq_len=64"],
         "data.seq_len 64 is longer than the checkpoint's model reads (max_seq_len 32): give --data.seq_len 32 or less"),
        (["--ckpt_path=missing.ckpt"], "--ckpt_path missing.ckpt: no such file"),  # read_checkpoint's errors
        ([], "no data configured: give --config FILE"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            main(["test", *args, quiet])
        assert message in capsys.readouterr().err, message


def test_a_foreign_checkpoint_is_named(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    for name, message in [("missing", "no such file"), ("plain", "no model hyperparameters in it"),
                          ("junk", "not a readable checkpoint")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"--ckpt_path .*{name}.ckpt: {message}"):
            read_checkpoint(str(tmp_path / f"{name}.ckpt"))


def test_seq_len_is_typed_once(text_file, tmp_path, capsys):
    """data.seq_len sets the model's max_seq_len; a value that does not fit the patch size is refused."""
    config = REPO / "configs" / "quickstart.yaml"
    # fast_dev_run turns the logger off: checkpoints would go to default_root_dir
    args = [*tiny_args(config, text_file, tmp_path), f"--trainer.default_root_dir={tmp_path}"]
    cli = main(["fit", *args, "--data.seq_len=64", "--trainer.fast_dev_run=1"])
    assert cli.model.config.max_seq_len == 64 == cli.datamodule.seq_len
    with pytest.raises(SystemExit):
        main(["fit", *args, "--data.seq_len=60", "--trainer.fast_dev_run=1"])
    assert "error: max_seq_len 60 is not a multiple of patch_size 8" in capsys.readouterr().err


def memory_options(model) -> tuple[bool, bool, int | None]:
    """(global model checkpointed, local model checkpointed, local chunk) of a MegaByte."""
    stacks = checkpointed_stacks(model)
    return "global_model" in stacks, "local_model" in stacks, local_chunk_patches(model)


def test_memory_options_are_run_options(text_file, tmp_path, monkeypatch):
    """Activation checkpointing and local chunks change how a checkpoint's model runs, not what it is: a
    checkpoint trained without them resumes with them (kept in its hyperparameters), and evaluates
    without them again, to the same bpb."""
    args = [*tiny_args(REPO / "configs" / "quickstart.yaml", text_file, tmp_path), "--trainer.max_time=null",
            "--trainer.limit_val_batches=0"]  # fmt: skip
    main(["fit", *args, "--trainer.max_steps=2"])
    (plain,) = (tmp_path / "logs").rglob("last.ckpt")
    on = ["--model.activation_checkpointing=[global_model, local_model]", "--model.local_chunk_patches=3"]
    resumed = main(["fit", *args, f"--ckpt_path={plain}", "--trainer.max_steps=3", *on])
    assert resumed.trainer.global_step == 3 and memory_options(resumed.model.model) == (True, True, 3)
    (last,) = (p for p in (tmp_path / "logs").rglob("last.ckpt") if p != plain)
    monkeypatch.chdir(tmp_path)
    evaluate = ["validate", f"--ckpt_path={last}", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=3"]
    kept = main(evaluate)
    off = main([*evaluate, "--model.activation_checkpointing=[]", "--model.local_chunk_patches=null"])
    assert memory_options(kept.model.model) == (True, True, 3) and memory_options(off.model.model) == (False, False, None)
    bpb = [cli.trainer.callback_metrics["val/bpb"].item() for cli in (kept, off)]
    assert bpb[0] == pytest.approx(bpb[1], rel=1e-6) and 0 < bpb[0] < 9


def test_a_whole_number_of_batches_is_a_count_and_a_fraction_a_share(text_file, tmp_path):
    """Lightning's limit_*_batches: 1 is one batch, 1.0 every batch; so from the command line and from a
    config file (the parser had read 1 as 1.0, typing having ordered the union float first)."""
    args = ["validate", *tiny_args(REPO / "configs" / "quickstart.yaml", text_file, tmp_path)]
    everything = main([*args, "--trainer.limit_val_batches=1.0"]).trainer.num_val_batches
    assert main([*args, "--trainer.limit_val_batches=1"]).trainer.num_val_batches == [1] != everything
    assert everything[0] > 3 and main([*args, "--trainer.limit_val_batches=0.5"]).trainer.num_val_batches == [everything[0] // 2]
    config = tmp_path / "limits.yaml"
    config.write_text("trainer:\n  limit_val_batches: 3\n  limit_test_batches: 1\n")
    cli = main([*args, f"--config={config}"])
    assert cli.trainer.num_val_batches == [3] and cli.trainer.limit_test_batches == 1
    assert isinstance(cli.trainer.limit_test_batches, int)


@pytest.mark.parametrize("subcommand", ["fit", "test", "generate"])
def test_help_lists_every_subcommand_and_each_its_options(subcommand, capsys):
    """Only the subcommand the command line begins with gets a parser of the signatures; the help still
    names all of them, and each subcommand's help has its own options."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    assert all(f"\n    {name}  " in listed for name in ("fit", "validate", "test", "predict", "generate"))
    with pytest.raises(SystemExit) as done:
        main([subcommand, "--help"])
    assert done.value.code == 0
    options = capsys.readouterr().out
    assert "--trainer.max_steps" in options and "--data CONFIG" in options and "--model.arch" in options
    assert ("--sample_len" in options) == (subcommand == "generate") and ("--ckpt_path" in options)


def test_cli_warns_when_patches_cut_across_pixel_blocks(tmp_path):
    """MNIST in RGB keeps configs/image/mnist.yaml's patch_size 4, which no longer holds whole 2 x 2 x 3 blocks."""
    args = [f"--config={REPO / 'configs' / 'image' / 'mnist.yaml'}", *cpu_trainer_args(tmp_path),
            f"--data.path={write_image_folder(tmp_path / 'images', n=4)}", "--data.image_size=8"]  # fmt: skip
    with pytest.warns(UserWarning, match="patch_size 4 is not a whole number of the patch scan's 2 x 2 x 3 = 12-byte"):
        main([*args, "--data.channels=3"], run=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!model patch_size)")  # only the patch warning is an error
        main([*args, "--data.channels=1"], run=False)
