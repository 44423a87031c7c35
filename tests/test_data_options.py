"""The options every DataModule shares (datamodules/base.py): checked once, with the same one-line errors."""

import ast
import hashlib
import importlib
import inspect
import os
from pathlib import Path

import pytest

from datamodules import AudioDataModule, ImageDataModule, TextDataModule
from datamodules.base import check_choice, check_positive, check_split, default_cache_dir, hash_files

MODULES = [(TextDataModule, {}), (ImageDataModule, {}), (AudioDataModule, {"path": "x"})]
IDS = ["text", "image", "audio"]


def error(build) -> str:
    with pytest.raises(ValueError) as info:
        build()
    assert "\n" not in str(info.value)  # a user error is one line
    return str(info.value)


@pytest.mark.parametrize("cls,kwargs", MODULES, ids=IDS)
@pytest.mark.parametrize("batch_size", [0, -3])
def test_every_datamodule_rejects_a_batch_size_below_1_alike(cls, kwargs, batch_size):
    message = error(lambda: cls(batch_size=batch_size, **kwargs))
    assert message == f"batch_size must be a positive integer, got {batch_size}"


@pytest.mark.parametrize("cls,kwargs", MODULES, ids=IDS)
def test_every_datamodule_sets_the_shared_options_and_saves_all_its_arguments(cls, kwargs, tmp_path):
    dm = cls(batch_size=3, seed=7, num_workers=0, cache_dir=str(tmp_path), **kwargs)
    assert (dm.batch_size, dm.seed, dm.num_workers, dm.cache_dir) == (3, 7, 0, tmp_path)
    # checkpoints keep every __init__ argument (the CLI restores the DataModule from them)
    assert set(dm.hparams) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert (dm.hparams["batch_size"], dm.hparams["seed"], dm.hparams["cache_dir"]) == (3, 7, str(tmp_path))


@pytest.mark.parametrize("cls,kwargs", MODULES, ids=IDS)
def test_the_default_cache_dir_is_megabyte_cache_then_xdg_then_home(cls, kwargs, tmp_path, monkeypatch):
    monkeypatch.setenv("MEGABYTE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cls(**kwargs).cache_dir == default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MEGABYTE_CACHE")
    assert cls(**kwargs).cache_dir == tmp_path / "xdg" / "megabyte"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cls(**kwargs).cache_dir == tmp_path / "home" / ".cache" / "megabyte"


EVALUATION_ONLY = [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0)]  # all of the data is the test split, or the val split
OR_EVALUATION_ONLY = "; or [0, 0, 1] to test or predict on all of the data, [0, 1, 0] to validate on all of it"


@pytest.mark.parametrize(
    "cls,kwargs,accepted,rule",
    [
        (TextDataModule, {}, EVALUATION_ONLY, "three positive fractions summing to 1 (train, val, test)"),
        (ImageDataModule, {}, [(0.9, 0.1, 0.0), *EVALUATION_ONLY],
         "three fractions (train, val, test) summing to 1 with train and val positive"),
        (AudioDataModule, {"path": "x"}, [(0.9, 0.1, 0.0), (0.9, 0.0, 0.1), (1.0, 0.0, 0.0)],
         "three fractions (train, val, test) summing to 1 with train positive"),
    ],
    ids=IDS,
)  # fmt: skip
def test_each_datamodule_checks_split_by_its_rule_with_one_message(cls, kwargs, accepted, rule):
    cls(split=(0.8, 0.1, 0.1), **kwargs)
    for split in accepted:
        cls(split=split, **kwargs)
    also = OR_EVALUATION_ONLY if cls is not AudioDataModule else ""  # text and image: evaluation-only data sources
    zero = [(0.9, 0.1, 0.0), (0.9, 0.0, 0.1), (1.0, 0.0, 0.0), *EVALUATION_ONLY]
    wrong = [(0.0, 0.5, 0.5), (0.5, 0.5, 0.5), (0.9, 0.2, -0.1), (0.5, 0.5), (0.25, 0.25, 0.25, 0.25)]
    for split in [s for s in zero if s not in accepted] + wrong:
        message = f"split must be {rule}, e.g. [0.9, 0.05, 0.05]{also}; got {split}"
        assert error(lambda: cls(split=split, **kwargs)) == message


@pytest.mark.parametrize("cls,kwargs", MODULES[1:], ids=IDS[1:])
def test_image_and_audio_reject_on_bad_file_alike(cls, kwargs):
    assert error(lambda: cls(on_bad_file="ignore", **kwargs)) == "on_bad_file must be 'warn' or 'raise', got 'ignore'"


def test_the_checks_name_the_option_and_the_values_allowed():
    check_positive("seq_len", 1)
    assert error(lambda: check_positive("seq_len", 0)) == "seq_len must be a positive integer, got 0"
    check_choice("scan", "patch", ("raster", "patch"))
    message = error(lambda: check_choice("scan", "zigzag", ("raster", "patch")))
    assert message == "scan must be 'raster' or 'patch', got 'zigzag'"
    check_split((0.9, 0.1, 0.0), may_be_zero=("test",))
    assert "with train and val positive" in error(lambda: check_split((0.9, 0.0, 0.1), may_be_zero=("test",)))


def cache_key(files: list[Path]) -> str:
    digest = hashlib.sha256()
    hash_files(digest, files)
    return digest.hexdigest()


def test_the_cache_key_follows_the_identity_of_the_source_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    key = cache_key([a, b])
    assert cache_key([a, b]) == key
    assert cache_key([b, a]) != key  # the order of the files is part of the corpus
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 1))
    assert cache_key([a, b]) != key  # edited in place
    b.write_bytes(b"three")
    assert cache_key([a, b]) != key


@pytest.mark.parametrize(
    "path",
    ["datamodules.TextDataModule", "datamodules.ImageDataModule", "datamodules.AudioDataModule",
     "datamodules.base.ByteDataModule", "datamodules.text.TextDataModule", "datamodules.image.ImageDataModule",
     "datamodules.audio.AudioDataModule", "datamodules.image.image_to_bytes", "datamodules.image.bytes_to_image",
     "datamodules.image.pixels_to_bytes", "datamodules.audio.decode_bytes"],
)  # fmt: skip
def test_the_class_paths_configs_and_checkpoints_store_still_import(path):
    module, name = path.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))


def test_imports_run_one_way_base_and_windows_at_the_bottom_no_modality_importing_another():
    root = Path(__file__).resolve().parent.parent / "datamodules"
    modalities = {"text", "image", "audio"}
    for file in root.rglob("*.py"):
        layer = file.relative_to(root).parts[0].removesuffix(".py")
        imported = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        used = {name.split(".")[1] for name in imported if name.startswith("datamodules.")}
        if layer in ("base", "windows"):
            assert not used & modalities, f"{file.name} imports {used & modalities}"
        elif layer in modalities:
            assert not used & (modalities - {layer}), f"{file} imports {used & (modalities - {layer})}"
