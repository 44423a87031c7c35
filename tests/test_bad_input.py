"""Nothing a user types destroys a trained model, and every bad input is one ``error:`` line (exit 2) that
names the file or option and the fix, leaving nothing half-written: no ``.part`` file, no empty cache
folder, no run folder for a run that never started. Every piece of advice such a line gives is run here."""

import gzip
import io
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import main
from datamodules import AudioDataModule, ImageDataModule, TextDataModule
from tests.audio_files import sine, write_tar, write_wav_folder
from tests.conftest import REPO
from tests.image_files import write_image_folder
from tests.test_cli import cpu_trainer_args, tiny_args

QUICKSTART = REPO / "configs" / "quickstart.yaml"
SHORT = ["--trainer.max_steps=2", "--trainer.max_time=null", "--trainer.limit_val_batches=1",
         "--trainer.val_check_interval=2", "--samples.every_n_validations=0"]  # fmt: skip


def refused(args: list[str], capsys) -> str:
    """Run the CLI on ``args``, which must end with exit status 2 and one ``error:`` line, no traceback;
    -> that line."""
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert not err.splitlines()[-1].startswith(" "), err  # the error is the last line, all of it
    return errors[0]


def assert_clean(tmp_path: Path) -> None:
    """No half-written file, no empty folder in the cache, no run folder."""
    cache = tmp_path / "cache"
    assert not list(tmp_path.rglob("*.part")), list(tmp_path.rglob("*.part"))
    assert not [d for d in cache.rglob("*") if d.is_dir() and not any(d.iterdir())]
    assert not (tmp_path / "logs").exists(), list((tmp_path / "logs").rglob("*"))


def text_fit(path: Path, tmp_path: Path, *extra: str) -> list[str]:
    args = tiny_args(QUICKSTART, path, tmp_path)
    return ["fit", *args, *SHORT, *extra]


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("last"))


# -- no silent overwrite -------------------------------------------------------------------------------


def test_the_readme_commands_in_order_leave_the_trained_model_intact(text_file, tmp_path, capsys, monkeypatch):
    """After ``make fit``, the README's commands of "The ``megabyte`` command" (test, generate, a new run,
    its resume), and the refused run into ``make fit``'s folder with the fix its error names."""
    fit = text_fit(text_file, tmp_path)
    main([*fit, "--trainer.max_steps=4"])  # make fit (version 0)
    run = tmp_path / "logs" / "quickstart" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    trained = torch.load(last, weights_only=True)
    monkeypatch.chdir(tmp_path)

    main(["test", f"--ckpt_path={last}", "--trainer.enable_progress_bar=false"])
    line = refused([*fit, "--trainer.logger.init_args.version", "0"], capsys)
    assert f"{run / 'checkpoints'} already holds the checkpoints of a run" in line
    assert "resume it with --ckpt_path last, or start a new run with --trainer.logger.init_args.version 1" in line
    # the advice: a resumed run (nothing left to train) and a new version
    main([*fit, "--trainer.max_steps=4", "--trainer.logger.init_args.version", "0", "--ckpt_path", "last"])
    main([*fit, "--trainer.logger.init_args.version", "1"])
    main(["generate", f"--ckpt_path={last}", "--output_dir=samples", "--sample_len=24", "--n_samples=1"])
    assert list((tmp_path / "samples").glob("sample_*.txt"))

    kept = torch.load(last, weights_only=True)
    assert kept["global_step"] == trained["global_step"] == 4
    assert all(torch.equal(kept["state_dict"][k], w) for k, w in trained["state_dict"].items())
    assert checkpoint_files(run / "checkpoints") == ["last.ckpt"]
    assert (tmp_path / "logs" / "quickstart" / "version_1" / "checkpoints" / "last.ckpt").is_file()


def test_a_resumed_run_replaces_its_last_checkpoint_and_nothing_else_writes_there(text_file, tmp_path, capsys):
    fit = text_fit(text_file, tmp_path, "--trainer.logger.init_args.version=0")
    main(fit)
    folder = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints"
    main([*fit, "--ckpt_path=last", "--trainer.max_steps=4"])
    assert checkpoint_files(folder) == ["last.ckpt"]  # not last.ckpt beside a last-v1.ckpt
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4
    (best,) = folder.glob("best-*.ckpt")
    main([*fit, f"--ckpt_path={best}", "--trainer.max_steps=5"])  # a checkpoint of its own folder resumes too
    assert checkpoint_files(folder) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 5
    # a checkpoint of another folder does not make this folder's checkpoints its own
    other = tmp_path / "other.ckpt"
    other.write_bytes((folder / "last.ckpt").read_bytes())
    line = refused([*fit, f"--ckpt_path={other}"], capsys)
    assert "already holds the checkpoints of a run" in line and "--trainer.logger.init_args.version 1" in line


# -- one line for every bad input ----------------------------------------------------------------------


def write_text_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (data path, what the error line must say)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "notgzip.txt.gz").write_bytes(b"hello, not gzip at all" * 10)
    (d / "cut.txt.gz").write_bytes(gzip.compress(os.urandom(5000))[:2000])
    (d / "empty.txt").write_bytes(b"")
    (d / "short.txt").write_bytes(b"x" * 20)
    (d / "dangling").symlink_to(d / "gone.txt")
    return {
        "not gzip": (d / "notgzip.txt.gz", f"data file '{d / 'notgzip.txt.gz'}' is not a complete .gz file (not gzip"),
        "truncated gzip": (d / "cut.txt.gz", f"data file '{d / 'cut.txt.gz'}' is not a complete .gz file (cut short)"),
        "zero bytes": (d / "empty.txt", f"data path '{d / 'empty.txt'}' holds no bytes"),
        "shorter than a window": (d / "short.txt", f"the train split of '{d / 'short.txt'}' has 19 bytes, fewer than one window of seq_len 32"),
        "broken link": (d / "dangling", f"data path '{d / 'dangling'}' is a broken link to '{d / 'gone.txt'}'"),
        "missing": (tmp_path / "nonexistent", f"data path '{tmp_path / 'nonexistent'}' does not exist"),
    }


def test_bad_text_data_is_one_line_and_leaves_nothing(text_file, tmp_path, capsys):
    for name, (path, message) in write_text_cases(tmp_path).items():
        line = refused([*text_fit(text_file, tmp_path), f"--data.path={path}"], capsys)
        assert message in line, (name, line)
        assert_clean(tmp_path)


def test_a_broken_link_in_a_folder_is_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"some text " * 50)
    (folder / "b.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.warns(UserWarning, match=r"skipping '.*b\.txt' in data folder .*: a broken link to '.*nowhere\.txt'"):
        dm = TextDataModule(str(folder), seq_len=8, num_workers=0, cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
    images = write_image_folder(tmp_path / "images", n=6)
    (images / "class_0" / "lost.png").symlink_to(tmp_path / "lost.png")
    with pytest.warns(UserWarning, match="skipping .*lost.png.* a broken link"):
        ImageDataModule(str(images), image_size=8, channels=3, num_workers=0, cache_dir=str(tmp_path / "cache")).setup("fit")
    audio = write_wav_folder(tmp_path / "audio", n=6)
    (audio / "9_lucas_9.wav").symlink_to(tmp_path / "lost.wav")
    with pytest.warns(UserWarning, match="skipping .*9_lucas_9.wav.* a broken link"):
        AudioDataModule(str(audio), seq_len=32, num_workers=0, cache_dir=str(tmp_path / "cache")).setup("fit")


def image_fit(path: Path, tmp_path: Path) -> list[str]:
    return ["fit", f"--config={REPO / 'configs' / 'image' / 'mnist.yaml'}", f"--data.path={path}", "--data.image_size=8",
            "--data.num_workers=0", f"--data.cache_dir={tmp_path / 'cache'}", *cpu_trainer_args(tmp_path), *SHORT]  # fmt: skip


def cut_tar(folder: Path, archive: Path) -> Path:
    write_tar(folder, archive)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    return archive


def test_bad_image_folders_and_archives_are_one_line_and_leave_nothing(tmp_path, capsys):
    d = tmp_path / "data"
    corrupt = d / "corrupt"
    corrupt.mkdir(parents=True)
    for i in range(3):
        (corrupt / f"{i}.png").write_bytes(b"\x89PNG not really" * i)
    images = write_image_folder(tmp_path / "images", n=40)
    (d / "junk.tar").write_bytes(b"not a tar archive" * 100)
    (d / "empty").mkdir()
    (d / "link.tar").symlink_to(d / "gone.tar")
    cases = {
        corrupt: f"no readable images in '{corrupt}': all 3 files are unreadable, e.g. {corrupt / '0.png'}",
        cut_tar(images, d / "cut.tar"): f"cannot read the archive '{d / 'cut.tar'}'",
        cut_tar(images, d / "cut.tar.gz"): f"cannot read the archive '{d / 'cut.tar.gz'}'",
        d / "junk.tar": f"cannot read the archive '{d / 'junk.tar'}'",
        d / "empty": f"data folder '{d / 'empty'}' contains no files",
        d / "link.tar": f"data path '{d / 'link.tar'}' is a broken link",
    }
    for path, message in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the warnings of the cut archives' last members
            line = refused(image_fit(path, tmp_path), capsys)
        assert message in line, (path, line)
        assert_clean(tmp_path)


def audio_fit(path: Path, tmp_path: Path, config: str = "fsdd.yaml") -> list[str]:
    return ["fit", f"--config={REPO / 'configs' / 'audio' / config}", f"--data.path={path}", "--data.seq_len=64",
            "--data.num_workers=0", f"--data.cache_dir={tmp_path / 'cache'}", *cpu_trainer_args(tmp_path), *SHORT]  # fmt: skip


def test_bad_audio_folders_and_archives_are_one_line_and_leave_nothing(tmp_path, capsys):
    d = tmp_path / "data"
    corrupt = d / "corrupt"
    corrupt.mkdir(parents=True)
    for i, index in enumerate((0, 5, 6, 7)):  # one of FSDD's test split, three of the others
        (corrupt / f"{i}_george_{index}.wav").write_bytes(b"RIFF....WAVEjunk" * (i + 1))
    wavs = write_wav_folder(tmp_path / "wavs", n=12)
    cases = {
        corrupt: f"no readable audio in '{corrupt}': all 4 files were skipped",
        cut_tar(wavs, d / "cut.tar.gz"): f"cannot read the archive '{d / 'cut.tar.gz'}'",
        d / "missing.tar": f"data path '{d / 'missing.tar'}' does not exist",
    }
    for path, message in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each skipped file's warning
            line = refused(audio_fit(path, tmp_path), capsys)
        assert message in line, (path, line)
        assert_clean(tmp_path)


def test_wavs_not_named_like_fsdd_get_a_working_hint(tmp_path, capsys):
    folder = tmp_path / "speech"
    folder.mkdir()
    import soundfile

    for i in range(10):
        soundfile.write(folder / f"clip{i:02d}.wav", sine(300 + 20 * i, 0.1, 8000), 8000, subtype="PCM_16")
    line = refused(audio_fit(folder, tmp_path), capsys)
    hint = "--data.test_pattern null --data.split [0.9, 0.05, 0.05]"
    assert r"test_pattern '_[0-4]\.wav$' matches none of the 10 file names" in line and hint in line
    assert_clean(tmp_path)
    cli = main([*audio_fit(folder, tmp_path), "--data.test_pattern=null", "--data.split=[0.9, 0.05, 0.05]"])
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_learning_rate_is_one_line(text_file, tmp_path, capsys, value):
    line = refused([*text_fit(text_file, tmp_path), f"--model.lr={value}"], capsys)
    assert line == f"error: --model.lr {value}: must be a finite number greater than 0"


# -- checkpoints of another medium ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The last.ckpt of a tiny text model (seq_len 32) and of a tiny image model (8 x 8 grey, 64 bytes)."""
    tmp_path = tmp_path_factory.mktemp("checkpoints")
    text = tmp_path / "text.txt"
    text.write_bytes(Path(os.__file__).read_bytes()[:8000])
    main(text_fit(text, tmp_path))
    images = write_image_folder(tmp_path / "images", n=12, channels=1)
    main([*image_fit(images, tmp_path), "--trainer.logger.init_args.name=mnist"])
    found = {run: next((tmp_path / "logs" / run).rglob("last.ckpt")) for run in ("quickstart", "mnist")}
    return {"text": found["quickstart"], "image": found["mnist"], "text_file": text, "images": images}


def test_a_checkpoint_of_another_medium_is_refused_and_the_advice_works(checkpoints, tmp_path, capsys):
    quiet = [*cpu_trainer_args(tmp_path), "--trainer.limit_test_batches=1"]
    image, text = checkpoints["image"], checkpoints["text"]
    as_text = ["test", f"--config={QUICKSTART}", f"--ckpt_path={image}", f"--data.path={checkpoints['text_file']}",
               "--data.seq_len=32", f"--data.cache_dir={tmp_path / 'cache'}", *quiet]  # fmt: skip
    line = refused(as_text, capsys)
    assert f"--ckpt_path {image} holds a model trained on image data (datamodules.ImageDataModule)" in line
    assert "not on this run's text data (datamodules.TextDataModule)" in line and "--allow_data_mismatch true" in line
    fit_from_it = ["fit", *as_text[1:], *SHORT]
    assert "trained on image data" in refused(fit_from_it, capsys)
    assert main([*as_text, "--allow_data_mismatch=true"]).trainer.callback_metrics["test/bpb"] > 0

    # a text model on CIFAR-10's config: refused; with the override, the data's sequences are too long for it
    cifar = ["test", f"--config={REPO / 'configs' / 'image' / 'cifar10.yaml'}", f"--ckpt_path={text}",
             f"--data.path={write_image_folder(tmp_path / 'rgb', n=12)}", f"--data.cache_dir={tmp_path / 'cache'}", *quiet]  # fmt: skip
    assert "trained on text data" in refused(cifar, capsys)
    line = refused([*cifar, "--allow_data_mismatch=true"], capsys)
    assert line.endswith("is longer than the checkpoint's model reads (max_seq_len 32): give --data.image_size 2 or less")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # patch_size 8 against the 2 x 2 x 3 blocks of the patch scan
        main([*cifar, "--allow_data_mismatch=true", "--data.image_size=2"])

    # same medium, other bytes: the image model's grey 8 x 8 images against RGB ones
    rgb = ["test", f"--ckpt_path={image}", f"--data.cache_dir={tmp_path / 'cache'}", *quiet, "--data.channels=3"]
    line = refused(rgb, capsys)
    assert "trained on data with channels 1, this run's has channels 3: give --data.channels 1" in line
    main([*rgb, "--data.channels", "1"])


# -- scoring a whole file ------------------------------------------------------------------------------


def test_an_evaluation_only_split_scores_every_byte_of_a_file(checkpoints, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_bytes(Path(np.__file__).read_bytes()[:3000])
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"twenty bytes of text")
    whole = ["--data.split=[0, 0, 1]", f"--data.cache_dir={tmp_path / 'cache'}", *cpu_trainer_args(tmp_path)]
    text = checkpoints["text"]
    default = main(["predict", f"--ckpt_path={text}", f"--data.path={other}", f"--data.cache_dir={tmp_path / 'cache'}",
                    *cpu_trainer_args(tmp_path), f"--predictions.path={tmp_path / 'part.npy'}"])  # fmt: skip
    assert len(np.load(tmp_path / "part.npy")) == len(default.datamodule.splits["test"]) < 3000 // 10
    for path, n in ((other, 3000), (tiny, 20)):
        main(["predict", f"--ckpt_path={text}", f"--data.path={path}", *whole, f"--predictions.path={tmp_path / 'all.npy'}"])
        assert len(np.load(tmp_path / "all.npy")) == n  # every byte of the file
        tested = main(["test", f"--ckpt_path={text}", f"--data.path={path}", *whole])
        assert tested.trainer.callback_metrics["test/bpb"] > 0
    validated = main(["validate", f"--ckpt_path={text}", f"--data.path={other}", *whole[1:], "--data.split=[0, 1, 0]"])
    assert len(validated.datamodule.splits["val"]) == 3000
    line = refused(["fit", f"--ckpt_path={text}", f"--data.path={other}", *whole], capsys)
    assert "is for evaluation only (no train split): fit needs positive train and val fractions" in line
