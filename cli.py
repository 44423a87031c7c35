"""Command-line entry point: ``python cli.py {fit,validate,test,predict,generate} --config configs/X.yaml``.

The datamodule is chosen in subclass mode (``data: class_path: datamodules.TextDataModule``), so
switching modality is switching the ``data:`` block. ``data.seq_len`` is linked to the model's
``max_seq_len``: it is typed once. With ``--ckpt_path FILE`` (on the command line or in a config
file) the model (and, unless given, the data) is rebuilt from the hyperparameters stored in the
checkpoint; the data's ``seq_len`` may then be shorter than the model's ``max_seq_len``.
``generate --ckpt_path FILE`` writes samples as files of the data's medium (``.txt``, ``.png``, ``.wav``):
its options are those of ``sampling.generate``, which does the sampling.
"""

import importlib
import inspect
import json
import logging
import os
import re
import sys
import sysconfig
import typing
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import sampling
from callbacks.checkpoint import ModelCheckpoint
from callbacks.fault_tolerance import FaultTolerance
from callbacks.predictions import BitsWriter
from callbacks.report import ValidationReport
from callbacks.samples import SampleCallback
from callbacks.throughput import ThroughputCallback
from datamodules.base import ByteDataModule
from megabyte import MegaByteConfig, MegaByteLM


def lightning_resolves(ckpt_path: str) -> bool:
    """A ``--ckpt_path`` that Lightning resolves itself: "last", "best", "hpc", "registry[:...]"."""
    return ckpt_path in ("last", "best", "hpc") or ckpt_path.lower().partition(":")[0] == "registry"


def read_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """The checkpoint's plain data; a clear error for a missing file or one this project did not write."""
    if not Path(ckpt_path).is_file():
        raise ValueError(f"--ckpt_path {ckpt_path}: no such file")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:
        why = f"{type(error).__name__}: {error}"
        raise ValueError(f"--ckpt_path {ckpt_path}: not a readable checkpoint ({why})") from error
    if not isinstance(ckpt, dict) or "arch" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(f"--ckpt_path {ckpt_path}: no model hyperparameters in it (not saved by this project)")
    return ckpt


def checkpoint_defaults(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Parser defaults that rebuild the model and the datamodule a checkpoint was trained with."""
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
    return datamodule_class(data.class_path).seq_len_from_args(init_args)


def processes_per_machine(devices: Any) -> int | None:
    """How many processes ``trainer.devices`` starts on a machine: a count, or a list of device indices
    (as a list or "0,1"); None where Lightning decides ("auto", -1)."""
    if isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    elif isinstance(devices, str):
        devices = int(devices) if devices.isdigit() else None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return devices if isinstance(devices, int) and devices > 0 else None


def fill_data_parallel_size(trainer: Namespace) -> None:
    """Under Lightning's ``ModelParallelStrategy`` with ``tensor_parallel_size`` 1 (FSDP2 alone,
    configs/distributed/fsdp.yaml), a ``data_parallel_size`` of "auto" becomes every process:
    ``trainer.devices`` x ``trainer.num_nodes``, so neither is typed twice. (Lightning's own "auto" is
    the number of machines, meant for tensor parallelism inside each, and fails here with more than one
    device a machine.) Left as it is where the devices are Lightning's to count ("auto", -1)."""
    strategy = trainer.get("strategy")
    if not isinstance(strategy, Namespace) or not str(strategy.get("class_path")).endswith(".ModelParallelStrategy"):
        return
    args, devices = strategy.get("init_args") or Namespace(), processes_per_machine(trainer.get("devices"))
    if args.get("tensor_parallel_size") == 1 and args.get("data_parallel_size", "auto") == "auto" and devices:
        args["data_parallel_size"] = devices * (trainer.get("num_nodes") or 1)
        strategy["init_args"] = args


def ckpt_path_argument(argv: list[str]) -> str | None:
    """The subcommand's ``ckpt_path``: the last one given, as ``--ckpt_path`` or in a ``--config`` file."""
    ckpt_path = None
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name not in ("--ckpt_path", "--config", "-c"):
            continue
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if name == "--ckpt_path":
            ckpt_path = value
        elif Path(value).is_file():
            config = yaml.safe_load(Path(value).read_text())
            if isinstance(config, dict) and "ckpt_path" in config:
                ckpt_path = config["ckpt_path"]
    return ckpt_path


# -- what a checkpoint was trained on, and where a run writes ----------------------------------------


def datamodule_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def cli_value(value: Any) -> str:
    """``value`` as it is typed after an option: a square [n, n] as n, other lists without spaces."""
    if isinstance(value, (list, tuple)):
        return str(value[0]) if len(set(value)) == 1 else json.dumps(list(value), separators=(",", ":"))
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def data_mismatch(ckpt_path: str, ckpt: dict[str, Any], data: Namespace) -> str | None:
    """Why the data configured (``data``: class_path and init_args) is not what the checkpoint's model was
    trained on: another medium (DataModule class), or bytes that mean something else (the DataModule's
    ``FORMAT_OPTIONS``: an image's size, channels and scan, audio's encoding and rate); None when it is."""
    saved = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if k != "_instantiator"}
    saved_class = saved.pop("_class_path", None)
    if saved_class is None or data is None:  # a checkpoint saved without its DataModule: nothing to compare
        return None
    override = "or --allow_data_mismatch true to use it anyway"
    if data.class_path != saved_class:
        cls, this = datamodule_class(saved_class), datamodule_class(data.class_path)
        return (
            f"--ckpt_path {ckpt_path} holds a model trained on {cls.media} data ({saved_class}), not on this run's "
            f"{this.media} data ({data.class_path}): leave the data out (the checkpoint's is the default) or give "
            f"data of its medium, {override}"
        )
    cls = datamodule_class(data.class_path)
    init_args = data.init_args.as_dict() if isinstance(data.init_args, Namespace) else dict(data.init_args or {})
    trained, configured = cls.data_format(saved), cls.data_format(init_args)
    for option in cls.FORMAT_OPTIONS:
        if json.dumps(trained[option]) != json.dumps(configured[option]):
            return (
                f"--ckpt_path {ckpt_path} holds a model trained on data with {option} {cli_value(trained[option])}, "
                f"this run's has {option} {cli_value(configured[option])}: give --data.{option} "
                f"{cli_value(trained[option])}, {override}"
            )
    return None


def checkpoint_folder(trainer: Trainer) -> Path | None:
    """Where the Trainer's ModelCheckpoint writes: its ``dirpath``, else ``checkpoints/`` in the run folder
    of the first logger (as Lightning resolves it), else in ``default_root_dir``; None without one."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    if callback.dirpath is not None:
        return Path(callback.dirpath)
    if not trainer.loggers:
        return Path(trainer.default_root_dir) / "checkpoints"
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version / "checkpoints"


def next_free_version(folder: Path) -> int:
    """One more than the largest ``version_<n>`` in ``folder`` (0 in a folder without any)."""
    numbers = [int(m[1]) for p in folder.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(numbers, default=-1) + 1


def overwrite_refusal(trainer: Trainer, ckpt_path: str | None) -> str | None:
    """Why ``fit`` must not start: its checkpoint folder already holds checkpoints and it does not resume
    from one of them (``--ckpt_path last``, or a file in that folder). None when it may start."""
    folder = checkpoint_folder(trainer)
    if folder is None or trainer.fast_dev_run or not folder.is_dir():
        return None
    existing = sorted(p.name for p in folder.glob("*.ckpt"))
    if not existing:
        return None
    if ckpt_path == "last" or (ckpt_path and Path(ckpt_path).resolve().parent == folder.resolve()):
        return None
    if trainer.checkpoint_callback.dirpath is not None:
        new_run = "another --checkpoint.dirpath"
    elif trainer.loggers and not isinstance(trainer.loggers[0].version, str):
        new_run = f"--trainer.logger.init_args.version {next_free_version(folder.parent.parent)} (the next free one)"
    else:
        new_run = "another --trainer.logger.init_args.version"
    shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
    return (
        f"{folder} already holds the checkpoints of a run ({shown}): resume it with --ckpt_path last, or start a "
        f"new run with {new_run}"
    )


def log_beside_checkpoint(trainer: Namespace, ckpt_path: str, subcommand: str) -> None:
    """Point a TensorBoard logger of ``validate`` / ``test`` / ``predict`` at the run that wrote the
    checkpoint: it logs into ``<run>/<subcommand>/`` (its own events, hparams.yaml and config.yaml, so the
    run's own are never replaced), where TensorBoard shows it beside the run; ``predict_bits.npy`` goes
    there too. Another logger, or none, is left as configured."""
    run, logger = sampling.checkpoint_run(ckpt_path), trainer.get("logger")
    if run is None or not isinstance(logger, Namespace) or not str(logger.get("class_path")).endswith("TensorBoardLogger"):
        return
    init_args = logger.get("init_args") or Namespace()
    for key, value in (("save_dir", str(run.parent.parent)), ("name", run.parent.name), ("version", run.name), ("sub_dir", subcommand)):
        init_args[key] = value
    init_args["default_hp_metric"] = False  # an evaluation has no val bpb to put in it
    logger["init_args"] = init_args


IRRELEVANT_MESSAGES = (
    "💡 Tip: For seamless cloud",  # litlogger / litmodels advertisements (logger and callback connectors)
    "`weights_only` was not set",  # the checkpoint connector's note; our checkpoints hold plain data
)


class DropMessages(logging.Filter):
    """Lightning's info lines that do not concern a user of this CLI (``IRRELEVANT_MESSAGES``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(IRRELEVANT_MESSAGES)


class NoFlops(logging.Filter):
    """Lightning's model summary without its FLOPs column and total: it counts FLOPs only for a model with
    an ``example_input_array``, so for ours it said 0 (``benchmarks/count_flops.py`` counts them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        lines = str(record.msg).split("\n")
        if not any(line.endswith("Total Flops") for line in lines):
            return True
        header = next((line for line in lines if line.rstrip().endswith("FLOPs")), None)
        cut = header.rindex(" | ") if header else None
        kept = []
        for line in lines:
            if line.endswith("Total Flops"):
                continue
            if cut is not None and set(line) == {"-"}:
                line = "-" * cut
            elif cut is not None and " | " in line:
                line = line[:cut].rstrip()
            kept.append(line)
        record.msg, record.args = "\n".join(kept), ()
        return True


def quiet_output(subcommand: str | None) -> None:
    """Filter, each at its source, what Lightning prints that does not concern a user of this CLI. Only
    these messages: everything else Lightning or PyTorch says still shows."""
    for name, kind in (
        ("lightning.pytorch.utilities.rank_zero", DropMessages),
        ("lightning.fabric.utilities.rank_zero", DropMessages),
        ("lightning.pytorch.trainer.connectors.checkpoint_connector", DropMessages),
        ("lightning.pytorch.callbacks.model_summary", NoFlops),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):  # main may run many times in a process
            logger.addFilter(kind())
    # Lightning's own pytree helper builds LeafSpec(), which torch 2.10+ deprecates.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", module=r"lightning\.pytorch\.utilities\._pytree")
    # seed_everything(None) warns, then says "Seed set to N" itself.
    warnings.filterwarnings("ignore", message="No seed found, seed set to")
    # A checkpoint of a run with max_time holds the state of the Timer that max_time adds; a run without
    # max_time has nothing to restore it into, and a run with one gets a Timer of its own.
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, .* Please add the following callbacks: \['Timer'\]\.$")
    # fit refuses a checkpoint folder that holds checkpoints unless it resumes from one of them
    # (overwrite_refusal): then the folder is its own, and Lightning's caution does not apply.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty", module=r"lightning\.pytorch\.callbacks\.model_checkpoint")
    if subcommand != "fit":
        # An evaluation restores the checkpoint's ModelCheckpoint state into a callback that never saves.
        warnings.filterwarnings("ignore", message="The dirpath has changed from", module=r"lightning\.pytorch\.callbacks\.model_checkpoint")


NON_FINITE_FLOAT = re.compile(r"Parser key \"([\w.]+)\":\s*Expected a <class 'float'>\. Got value: ([+-]?(nan|inf|infinity))\s*$", re.I)


class MegaByteArgumentParser(LightningArgumentParser):
    """Lightning's parser, with one error said plainly: jsonargparse reads ``nan`` and ``inf`` as strings, so
    ``--model.lr nan`` was "Expected a <class 'float'>. Got value: nan"."""

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        if match := NON_FINITE_FLOAT.search(message):
            positive = " greater than 0" if match[1].rpartition(".")[2] == "lr" else ""
            message = f"--{match[1]} {match[2]}: must be a finite number{positive}"
        super().error(message, ex)


def int_before_float(function: Callable) -> None:
    """Put ``int`` before ``float`` in every ``Union`` of ``function``'s annotations that has both.

    The parser tries a union's types in order, so with ``float`` first ``--trainer.limit_val_batches 1``
    gave 1.0: every batch, not one. Lightning writes ``Optional[Union[int, float]]``, but ``typing``
    caches unions by equality, which ignores order, so the annotation is whichever of the two orders
    was built first in the process (``Union[float, int, None]`` with Lightning 2.6)."""
    annotations = inspect.unwrap(function).__annotations__
    for name, hint in annotations.items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Union and float in args and int in args[args.index(float) :]:
            ordered = [a for a in args if a is not int]
            ordered.insert(ordered.index(float), int)
            annotations[name] = typing.Union[tuple(ordered)]


class MegaByteCLI(LightningCLI):
    checkpoint_max_seq_len: int | None = None
    """The ``max_seq_len`` of the model in ``--ckpt_path``, set while parsing."""
    checkpoint: tuple[str, dict[str, Any]] | None = None
    """(``--ckpt_path``, the checkpoint's plain data), set while parsing; None without one."""
    too_long: str | None = None
    """Why the data's sequences do not fit the checkpoint's model, set while parsing; None when they do."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.arch.init_args.max_seq_len", compute_fn=self.model_max_seq_len)
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
        parser.add_lightning_class_args(SampleCallback, "samples")
        parser.add_lightning_class_args(ThroughputCallback, "throughput")
        parser.add_lightning_class_args(FaultTolerance, "fault_tolerance")
        parser.add_lightning_class_args(BitsWriter, "predictions")
        parser.add_lightning_class_args(ValidationReport, "validation_report")
        parser.add_argument(
            "--allow_data_mismatch", type=bool, default=False,
            help="Use the --ckpt_path checkpoint on data of another medium or format than it was trained on (an "
            "image's size, channels or scan, audio's encoding or rate), which is otherwise refused.",
        )  # fmt: skip

    def model_max_seq_len(self, data: Namespace | None) -> int:
        """The model's ``max_seq_len``: the data's sequence length, or with ``--ckpt_path`` the
        checkpoint's (the data's may then be shorter)."""
        if data is None:
            raise ValueError("no data configured: give --config FILE (e.g. configs/quickstart.yaml) or --ckpt_path")
        seq_len = data_seq_len(data)
        if self.checkpoint_max_seq_len is None:
            return seq_len
        self.too_long = None
        if seq_len > self.checkpoint_max_seq_len:
            init_args = data.init_args.as_dict() if isinstance(data.init_args, Namespace) else dict(data.init_args)
            shorter = datamodule_class(data.class_path).shorter_seq_len(init_args, self.checkpoint_max_seq_len)
            what = f"data.seq_len {seq_len}" if "seq_len" in init_args else f"the data's {seq_len}-byte sequences"
            # refused in before_instantiate_classes, after a checkpoint of another medium, which is the cause
            self.too_long = (
                f"{what} is longer than the checkpoint's model reads (max_seq_len "
                f"{self.checkpoint_max_seq_len}): give {shorter} or less"
            )
        return self.checkpoint_max_seq_len

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "generate": {"trainer", "model", "datamodule"}}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", MegaByteArgumentParser)
        argv = sys.argv[1:] if kwargs.get("args") is None else kwargs["args"]
        self._argv = argv if isinstance(argv, list) else []  # [] for arguments given as a dict or Namespace
        self._first_subcommand = self._argv[0] if self._argv and self._argv[0] in self.subcommands() else None
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands (methods of the Trainer) plus ``generate`` (``sampling.generate``).

        Only the subcommand that the command line begins with gets its options: building a parser of the
        Trainer's, model's, data's and callbacks' signatures takes about a second each. The others
        stay names (so ``--help`` lists them); without a subcommand first, all get their options."""
        self._subcommand_parsers = {}
        parser_subcommands = parser.add_subcommands()
        for name in self.subcommands():
            function = sampling.generate if name == "generate" else getattr(self.trainer_class, name)
            description = DESCRIPTIONS.get(name) or inspect.getdoc(function).split("\n")[0]
            subparser_kwargs = {"description": description, **kwargs.get(name, {})}
            if self._first_subcommand in (None, name):
                subparser = self._prepare_subcommand_parser(self.trainer_class, name, **subparser_kwargs)
            else:
                subparser = self.init_parser(**subparser_kwargs)
            self._subcommand_parsers[name] = subparser
            parser_subcommands.add_subcommand(name, subparser, help=description)
        for name, description in TOOLS.items():  # listed in --help; main runs them without a Trainer
            parser_subcommands.add_subcommand(name, self.init_parser(description=description), help=description)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's, but ``generate``'s options are the arguments of ``sampling.generate`` (less the
        Trainer, model and DataModule, which this class gives it)."""
        if subcommand != "generate":
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser = self.init_parser(**kwargs)
        self._add_arguments(parser)
        skip = set(self.subcommands()[subcommand])
        self._subcommand_method_arguments[subcommand] = parser.add_function_arguments(sampling.generate, skip=skip)
        return parser

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in ("fit", "validate", "test", "predict"):
            self.prepare_data_first(subcommand)
        if subcommand == "generate":  # not a Trainer method
            self.generate(**self._prepare_subcommand_kwargs(subcommand))
        else:
            super()._run_subcommand(subcommand)

    def generate(self, **options: Any) -> list[Path]:
        """Check ``generate``'s options, then sample with this Trainer (``sampling.generate``) -> the files.

        A refused option is the parser's error (usage, the message, exit 2, as in instantiate_classes),
        before anything is loaded or written; the options checked are those that
        ``sampling.check_generate_options`` names."""
        checked = inspect.signature(sampling.check_generate_options).parameters
        try:
            sampling.check_generate_options(**{k: options[k] for k in checked})
        except ValueError as error:
            self._parser("generate").error(str(error), ex=error)
        return sampling.generate(self.trainer, **options)

    def prepare_data_first(self, stage: str) -> None:
        """Prepare the data and set it up for ``stage`` before the Trainer runs, so that anything wrong with a
        data path, file, folder or archive is the parser's error (one line, exit 2) before a run folder is
        made. The first process of each machine does it (``LOCAL_RANK`` 0, who runs Lightning's
        ``prepare_data``); the others wait for it inside the Trainer, where both are then no-ops."""
        if self.datamodule is None or int(os.environ.get("LOCAL_RANK", 0)) != 0:
            return
        try:
            self.datamodule.prepare_data()
            self.datamodule.setup(stage)
        except (ValueError, OSError, EOFError, RuntimeError) as error:  # bad data, a failed download
            self._parser(stage).error(str(error), ex=error)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        fill_data_parallel_size(config["trainer"])
        if self.checkpoint is not None and not config.get("allow_data_mismatch"):
            mismatch = data_mismatch(*self.checkpoint, config.get("data"))
            if mismatch:
                self._parser(self.subcommand).error(mismatch)
        if self.too_long:
            self._parser(self.subcommand).error(self.too_long)
        if self.subcommand in ("validate", "test", "predict") and self.checkpoint is not None:
            log_beside_checkpoint(config["trainer"], self.checkpoint[0], self.subcommand)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as error:
            # A value that the model, the data, a callback or the Trainer refuses: the parser's error
            # (usage, the message, exit 2; JSONARGPARSE_DEBUG=true raises it), not a traceback through the
            # class instantiation whose last line reads "Does not validate against any of the Union subtypes".
            cause = error
            while isinstance(cause.__cause__, (ValueError, MisconfigurationException)):
                cause = cause.__cause__
            self._parser(self.subcommand).error(str(cause), ex=cause)
        if self.subcommand == "fit":  # a new run never writes over the checkpoints of another
            refusal = overwrite_refusal(self.trainer, self.config["fit"].get("ckpt_path"))
            if refusal:
                self._parser("fit").error(refusal)
        # A warning, not an error: misaligned patches train (the paper's raster-scan images do), only worse.
        arch, datamodule = self.model.config, self.datamodule
        if isinstance(arch, MegaByteConfig) and isinstance(datamodule, ByteDataModule):
            mismatch = datamodule.patch_mismatch(arch.patch_size)
            if mismatch:
                rank_zero_warn(mismatch)

    RUN_OPTIONS = ("strided_eval", "compile", "compile_mode", "activation_checkpointing", "local_chunk_patches")
    """Model options that change how a checkpoint's model runs, not what it is: the command line and a
    config file keep them with ``--ckpt_path`` (Lightning forces the others from the checkpoint)."""

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        chosen = {k: self.config[f"{subcommand}.model.{k}"] for k in self.RUN_OPTIONS} if subcommand else {}
        super()._parse_ckpt_path()
        for k, v in chosen.items():
            self.config[f"{subcommand}.model.{k}"] = v

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # A checkpoint's hyperparameters become defaults: a config file and the command line
        # still override those of the data (Lightning then forces the model's from the checkpoint).
        if self._first_subcommand in getattr(self, "_subcommand_parsers", {}):  # none with run=False
            subcommand_parser = self._subcommand_parsers[self._first_subcommand]
            ckpt_path = ckpt_path_argument(self._argv)
            if ckpt_path and not lightning_resolves(ckpt_path):
                try:
                    ckpt = read_checkpoint(ckpt_path)
                except ValueError as error:
                    subcommand_parser.error(str(error))
                subcommand_parser.set_defaults(checkpoint_defaults(ckpt))
                self.checkpoint = (ckpt_path, ckpt)
                self.checkpoint_max_seq_len = ckpt["hyper_parameters"]["arch"]["init_args"]["max_seq_len"]
        super().parse_arguments(parser, args)


def configs_dir() -> Path:
    """The shipped configs: ``configs/`` beside this file in a checkout (or an editable install), else
    where ``pip install`` puts them (``<prefix>/share/megabyte-lightning/configs``, setup.cfg's data_files)."""
    beside = Path(__file__).resolve().parent / "configs"
    return beside if beside.is_dir() else Path(sysconfig.get_path("data")) / "share" / "megabyte-lightning" / "configs"


def config_names(argv: list[str]) -> list[str]:
    """``--config NAME`` for a shipped config (``quickstart``, ``image/mnist``) -> its path; a value that
    is a file, or that names no shipped config, is left for the parser to read or refuse."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name not in ("--config", "-c"):
            continue
        j, value = (i, value) if eq else (i + 1, argv[i + 1] if i + 1 < len(argv) else "")
        shipped = configs_dir() / f"{value.removesuffix('.yaml')}.yaml"
        if value and not Path(value).exists() and shipped.is_file():
            argv[j] = f"{name}={shipped}" if eq else str(shipped)
    return argv


DESCRIPTIONS = {
    "fit": "Train a model (resume one with --ckpt_path).",
    "validate": "Score the validation split: val/bpb.",
    "test": "Score the test split: test/bpb.",
    "predict": "Write the bits spent on every byte of the test split to predict_bits.npy.",
}
"""One line for each of Lightning's subcommands in ``--help`` (their docstrings' first lines break mid-sentence)."""

TOOLS = {
    "export": "Write a checkpoint's model as DIR/config.json and DIR/model.safetensors (weights only).",
    "compress": "Compress a file IN into OUT with a trained model (lossless; decompress with the same model).",
    "decompress": "Decompress a file IN written by compress into OUT, with the model that compressed it.",
}
"""Subcommands that use a trained model without a Trainer: parsed here, run by ``megabyte.pretrained``."""


def tool_parser(name: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"megabyte {name}", description=TOOLS[name], exit_on_error=True)
    if name == "export":
        parser.add_argument("ckpt_path", type=str, help="A checkpoint written by fit (.ckpt).")
        parser.add_argument("folder", type=str, help="The folder to write (new or empty).")
        parser.add_argument("--dtype", type=str | None, default=None, help="float32, bfloat16 or float16 weights (default: as trained, float32).")
    if name in ("compress", "decompress"):
        parser.add_argument("--ckpt_path", type=str, required=True, help="The model: a checkpoint (.ckpt) or a folder written by export.")
        parser.add_argument("input", type=str, help="The file to read.")
        parser.add_argument("output", type=str, help="The file to write (it must not exist).")
        parser.add_argument("--device", type=str | None, default=None, help="cuda or cpu (default: cuda where there is a GPU). A file decompresses on the kind of device and software it was compressed on.")
        parser.add_argument("--dtype", type=str | None, default=None, help="float32 (default), bfloat16 or float16 weights: decompress with the dtype compress used.")
    if name == "compress":
        parser.add_argument("--chunk_len", type=int | None, default=None, help="Bytes of each independently coded chunk, up to the model's max_seq_len (default).")
        parser.add_argument("--batch_size", type=int, default=64, help="Chunks coded at once (speed and memory; decompress uses the same).")
        parser.add_argument("--medium", type=bool | None, default=None, help="Image and audio models: true codes the medium's content (pixels, samples) and decompress writes a PNG / WAV; false codes the file's bytes; default: the content only where decompress gives back the very file.")
    return parser


def run_tool(argv: list[str]) -> None:
    """``export CKPT DIR``, ``compress`` / ``decompress --ckpt_path CKPT IN OUT``: a refused input is the
    parser's one ``error:`` line (exit 2), and OUT is written whole or not at all (a temporary file beside
    it, renamed when complete)."""
    import megabyte

    name, parser = argv[0], tool_parser(argv[0])
    options = parser.parse_args(argv[1:])
    try:
        if name == "export":
            folder = megabyte.export(options.ckpt_path, options.folder, options.dtype)
            print(f"wrote {folder / 'config.json'} and {folder / 'model.safetensors'}")
        if name in ("compress", "decompress"):
            coding_tool(name, options)
    except (ValueError, OSError) as error:
        parser.error(str(error))


def coding_tool(name: str, options: Namespace) -> None:
    """``compress`` or ``decompress`` IN to OUT with a progress bar on stderr (where it is a terminal) and
    a one-line summary; raises ValueError / OSError for the parser to report."""
    import tempfile
    import time

    from tqdm import tqdm

    import megabyte
    from megabyte.compression import read_header

    source, target = Path(options.input), Path(options.output)
    if target.exists():
        raise ValueError(f"{target} exists: give a new file name for the output, or remove it")
    if not source.is_file():
        raise ValueError(f"{source}: no such file")
    data = source.read_bytes()
    model = megabyte.load(options.ckpt_path, device=options.device, dtype=options.dtype)
    # compress codes the medium's content (its size is known once it is read), decompress its header's length
    total = read_header(data).length if name == "decompress" else None
    with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None, leave=False) as bar:
        started = time.perf_counter()
        if name == "compress":
            out = model.compress(data, options.chunk_len, options.batch_size, options.medium, progress=bar.update)
        else:
            out = model.decompress(data, progress=bar.update)
        seconds = time.perf_counter() - started
    if target.exists():
        raise ValueError(f"{target} appeared while {name} ran: the output was not written")
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False) as f:
        partial = Path(f.name)
    try:
        partial.write_bytes(out)
        partial.rename(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    original = len(data) if name == "compress" else len(out)
    coded = read_header(out if name == "compress" else data)
    mode = {"raw": "its bytes", "medium": f"the {model.medium}'s content ({coded.length:,} bytes)"}[coded.mode]
    if name == "compress" and coded.mode == "raw" and model.medium != "text" and options.medium is None:
        mode += f" (as the {model.medium}'s content it would not decompress to this very file; --medium true codes that)"
    print(
        f"{name}ed {source} ({len(data):,} bytes) to {target} ({len(out):,} bytes): coded {mode}, "
        f"{8 * len(out if name == 'compress' else data) / max(original, 1):.4f} bits per byte, "
        f"{original / max(seconds, 1e-9):,.0f} bytes/s (chunk_len {coded.chunk_len}, batch_size {coded.batch_size})"
    )


def main(args: list[str] | None = None, run: bool = True) -> MegaByteCLI | None:
    """Parse ``args`` (default: the command line) and run the subcommand; with ``run=False`` there is
    no subcommand: the model, data and Trainer are only built (benchmarks drive them). ``--config
    NAME`` may name a shipped config (``quickstart``); ``export`` runs without a Trainer (-> None)."""
    if args is None:
        sys.argv[1:] = config_names(sys.argv[1:])
    else:
        args = config_names(args)
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in TOOLS:
        run_tool(argv)
        return None
    quiet_output(argv[0] if argv else None)
    torch.set_float32_matmul_precision("high")  # TF32 for any float32 matmul on recent GPUs
    int_before_float(Trainer.__init__)  # --trainer.limit_val_batches 1 is one batch, 1.0 all of them
    # Lightning warns on every mid-epoch resume that the DataLoader cannot resume; our DataModules
    # restore their sampling state themselves (ByteDataModule.state_dict), so it does not apply.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
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
        run=run,
    )


def command() -> None:
    """The ``megabyte`` command (setup.cfg's console script): ``main`` on the command line."""
    main()


if __name__ == "__main__":
    command()
