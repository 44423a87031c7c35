"""Command-line entry point: ``python cli.py {fit,validate,test,predict} --config configs/X.yaml``.

The datamodule is chosen in subclass mode (``data: class_path: datamodules.TextDataModule``), so
switching modality is switching the ``data:`` block. ``data.seq_len`` is linked to the model's
``max_seq_len``: it is typed once. With ``--ckpt_path FILE`` the model (and, unless given, the data)
is rebuilt from the hyperparameters stored in the checkpoint.
"""

import importlib
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.base import ByteDataModule
from megabyte import MegaByteLM


def checkpoint_defaults(ckpt_path: str) -> dict[str, Any]:
    """Parser defaults that rebuild the model and the datamodule a checkpoint was trained with."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    defaults = {}
    for key, group in (("hyper_parameters", "model"), ("datamodule_hyper_parameters", "data")):
        hparams = {k: v for k, v in ckpt.get(key, {}).items() if k != "_instantiator"}
        if "_class_path" in hparams:
            class_path = hparams.pop("_class_path")
            defaults[group] = {"class_path": class_path, "init_args": hparams}
        else:
            defaults.update({f"{group}.{k}": v for k, v in hparams.items()})
    return defaults


def data_seq_len(data: Namespace) -> int:
    """The sequence length of the chosen DataModule (``data.init_args.seq_len`` for text and audio;
    height x width x channels for images), linked to the model's ``max_seq_len``."""
    init_args = data.init_args.as_dict() if isinstance(data.init_args, Namespace) else dict(data.init_args)
    module, _, name = data.class_path.rpartition(".")
    datamodule_class = getattr(importlib.import_module(module), name)
    return datamodule_class.seq_len_from_args(init_args)


def ckpt_path_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


class MegaByteCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.arch.init_args.max_seq_len", compute_fn=data_seq_len)
        # Always present, configurable as --checkpoint.* and --lr_monitor.*
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/bpb",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-step{step}-bpb{val/bpb:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # A checkpoint's hyperparameters become defaults: a config file and the command line
        # still override them (Lightning then forces the model's from the checkpoint).
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list) and argv and argv[0] in self._subcommand_parsers:
            ckpt_path = ckpt_path_argument(argv)
            if ckpt_path and Path(ckpt_path).is_file():
                self._subcommand_parsers[argv[0]].set_defaults(checkpoint_defaults(ckpt_path))
        super().parse_arguments(parser, args)


def main(args: list[str] | None = None) -> MegaByteCLI:
    torch.set_float32_matmul_precision("high")  # TF32 for any float32 matmul on recent GPUs
    return MegaByteCLI(
        MegaByteLM,
        ByteDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "logs", "name": "megabyte"},
            },
        },
        args=args,
    )


if __name__ == "__main__":
    main()
