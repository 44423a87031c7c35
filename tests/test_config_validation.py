"""Every invalid option is rejected when the CLI builds the model and data, before any data is read:
the data path does not exist, so reading it would fail with another error."""

import re

import pytest

from cli import main
from datamodules import TextDataModule
from megabyte import MegaByteLM
from tests.conftest import REPO, tiny_megabyte_config, tiny_transformer_config

QUICKSTART = REPO / "configs" / "quickstart.yaml"
MNIST = REPO / "configs" / "image" / "mnist.yaml"


@pytest.mark.parametrize(
    "config, option, message",
    [
        (QUICKSTART, "--data.seq_len=500", r"max_seq_len 500 is not a multiple of patch_size 8 \(max_seq_len is data.seq_len in the CLI\): use max_seq_len 496 or 504"),
        (QUICKSTART, "--model.arch.init_args.d_local=512", "d_local 512 is wider than d_global 256: use d_local <= d_global"),
        (QUICKSTART, "--model.lr=-0.001", "need lr > 0.*lr=-0.001"),
        (QUICKSTART, "--data.split=[0.5, 0.5, 0.5]", "split must be three positive fractions summing to 1"),
        (QUICKSTART, "--model.activation_checkpointing=[local]", r"activation_checkpointing names \['local'\], not a stack of MegaByte: choose among \['global_model', 'local_model'\]"),
        (QUICKSTART, "--trainer.limit_val_batches=1.5", r"You have passed invalid value 1.5 for limit_val_batches"),
        (MNIST, "--data.scan_patch=3", "image_size 28x28 is not divisible by scan_patch 3: use image_size 30x30 or scan_patch 2"),
    ],
)
def test_invalid_option_is_rejected_before_data_is_read(config, option, message, tmp_path, capsys):
    """The parser's error: its last line names the option's problem (no traceback), exit status 2."""
    args = ["fit", f"--config={config}", f"--data.path={tmp_path / 'missing'}", f"--data.cache_dir={tmp_path}",
            "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp_path}", option]  # fmt: skip
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code == 2
    assert re.fullmatch(f"error: {message}.*", capsys.readouterr().err.strip().splitlines()[-1])
    assert not any(tmp_path.iterdir())  # nothing cached, nothing logged


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: tiny_megabyte_config(n_global_layers=0), "n_global_layers must be a positive integer, got 0"),
        (lambda: tiny_megabyte_config(n_local_layers=0), "n_local_layers must be a positive integer, got 0"),
        (lambda: tiny_transformer_config(n_layers=0), "n_layers must be a positive integer, got 0"),
        (lambda: tiny_megabyte_config(d_global=34), r"d_global 34 is not a multiple of patch_size 4 \(every byte .*\): use d_global 32 or 36"),
        (lambda: tiny_megabyte_config(n_global_heads=3), "d_global 32 is not a multiple of n_global_heads 3"),
        (lambda: tiny_megabyte_config(d_local=64, n_local_heads=2), "d_local 64 is wider than d_global 32: use d_local <= d_global"),
        (lambda: tiny_megabyte_config(dropout=-0.1), r"dropout must be in \[0, 1\), got -0.1"),
        (lambda: tiny_megabyte_config(init_std=-1.0), "init_std must be positive, got -1.0"),
        (lambda: MegaByteLM(tiny_megabyte_config(), weight_decay=-1), "weight_decay >= 0.*weight_decay=-1"),
        (lambda: MegaByteLM(tiny_megabyte_config(), warmup_steps=-5), "warmup_steps >= 0.*warmup_steps=-5"),
        (lambda: MegaByteLM(tiny_megabyte_config(), min_lr_ratio=-0.5), "min_lr_ratio <= 1.*min_lr_ratio=-0.5"),
        (lambda: MegaByteLM(tiny_megabyte_config(), betas=(0.9, 1.5)), r"betas must be two numbers in \[0, 1\)"),
        (lambda: MegaByteLM(tiny_megabyte_config(), local_chunk_patches=0), "local_chunk_patches must be a positive integer or null, got 0"),
        (lambda: MegaByteLM(tiny_transformer_config(), local_chunk_patches=4), "local_chunk_patches chunks MegaByte's local model; ByteTransformer has none"),
        (lambda: MegaByteLM(tiny_transformer_config(), activation_checkpointing=("local_model",)), r"choose among \['transformer'\]"),
        (lambda: TextDataModule(batch_size=0), "batch_size must be a positive integer, got 0"),
        (lambda: TextDataModule(seq_len=0), "seq_len must be a positive integer, got 0"),
    ],
)
def test_invalid_value_names_the_option(build, message):
    with pytest.raises(ValueError, match=message):
        build()
