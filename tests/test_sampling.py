"""Sampling (sampling.py): prompts, option checks and the samples ``cli.py generate`` writes as files of
the data's medium. (The sample callback's TensorBoard events are tests/test_samples.py's.)"""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import main
from datamodules import AudioDataModule, ImageDataModule, TextDataModule
from megabyte import MegaByteLM, generate
from sampling import as_code_block
from tests.conftest import REPO


def test_code_block_keeps_whitespace_and_backticks():
    assert as_code_block("a\n  b```\n") == "    a\n      b```\n    "


def test_a_long_prompt_keeps_the_end_of_text_and_audio_and_the_start_of_an_image():
    prompt = torch.arange(10)
    assert TextDataModule("unused").cut_prompt(prompt, 5).tolist() == [5, 6, 7, 8, 9]
    assert AudioDataModule("unused", encoding="pcm16").cut_prompt(prompt, 5).tolist() == [6, 7, 8, 9]  # whole samples
    assert AudioDataModule("unused", encoding="mulaw").cut_prompt(prompt, 5).tolist() == [5, 6, 7, 8, 9]
    assert ImageDataModule(image_size=2, channels=3).cut_prompt(prompt, 5).tolist() == [0, 1, 2, 3, 4]


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


def test_generate_from_a_checkpoint_writes_files(text_file, tmp_path, monkeypatch, capsys):
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
    expected = generate(lm.model, prompt, 21, temperature=0)[0]
    assert np.array_equal(np.frombuffer((out / "sample_0.txt").read_bytes(), dtype=np.uint8), expected.numpy())

    # A prompt file longer than the sample: the sample continues its end (its last prompt_fraction of
    # sample_len bytes; default sample_len: data.seq_len, 32).
    text = b"import os\nimport sys\n\ndef main(argv):\n    return 0\n"
    (tmp_path / "long.txt").write_bytes(text)
    with pytest.warns(UserWarning, match=f"gives {len(text)} bytes, at least sample_len \\(32\\): prompting with 16"):
        main([*args, f"--prompt_file={tmp_path / 'long.txt'}", "--n_samples=1", "--temperature=0"])
    expected = generate(lm.model, torch.tensor([list(text[-16:])]), 16, temperature=0)[0]
    assert np.array_equal(np.frombuffer((out / "sample_0.txt").read_bytes(), dtype=np.uint8), expected.numpy())
    for option, message in [("--sample_len=0", "sample_len must be >= 1"), ("--prompt_fraction=1.5", "prompt_fraction"),
                             ("--sample_len=33", r"sample_len must be in 1\.\.32 \(the model's max_seq_len\)"),
                             ("--top_k=0", "top_k must be in")]:  # fmt: skip
        with pytest.raises(SystemExit) as refused:  # the parser's error, before any sampling
            main([*args, option, f"--output_dir={tmp_path / 'refused'}"])
        assert refused.value.code == 2 and re.match(f"error: {message}", capsys.readouterr().err.splitlines()[-1])
    assert not (tmp_path / "refused").exists()

    # A prompt file exactly as long as the sample is cut too: to the last prompt_fraction of the sample.
    main([*args, f"--prompt_file={tmp_path / 'prompt.txt'}", "--n_samples=1", "--sample_len=9", "--prompt_fraction=0.5"])
    assert (out / "sample_0.txt").read_bytes()[:4] == b"ain("


def test_generate_writes_images_and_audio_from_prompt_files(tmp_path):
    from tests.audio_files import write_wav_folder
    from tests.image_files import write_image_folder

    images, audio = write_image_folder(tmp_path / "images", n=12), write_wav_folder(tmp_path / "audio", n=12)
    prompt_image = next(images.rglob("*.png"))
    for config, data, prompt, sample_len, suffix in (
        ("image/cifar10.yaml", [f"--data.path={images}", "--data.image_size=8"], next(images.rglob("*.png")), 192, ".png"),
        ("audio/fsdd.yaml", [f"--data.path={audio}", "--data.seq_len=64"], next(audio.glob("*.wav")), 4096, ".wav"),
    ):  # fmt: skip
        P = 12 if "cifar" in config else 16
        args = [
            f"--config={REPO / 'configs' / config}", *data, "--data.batch_size=2", "--data.num_workers=0",
            f"--data.cache_dir={tmp_path / 'cache'}", f"--model.arch.init_args.d_global={4 * P}",
            "--model.arch.init_args.n_global_heads=2", "--model.arch.init_args.d_local=16",
            "--model.arch.init_args.n_local_heads=2", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
            "--trainer.max_time=null", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs' / suffix[1:]}",
        ]  # fmt: skip
        main(["fit", *args, "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1"])
        (last,) = (tmp_path / "logs" / suffix[1:]).rglob("last.ckpt")
        out = tmp_path / f"samples{suffix}"
        gen = ["generate", *args, f"--ckpt_path={last}", f"--output_dir={out}", "--n_samples=1"]
        if suffix == ".png":  # prompt: the top half of an image file, encoded like the training data
            main([*gen, f"--prompt_file={prompt}"])
        else:  # prompt: the first half of a validation window
            main(gen)
        assert (out / f"sample_0{suffix}").is_file()
    from PIL import Image

    completed, original = (np.asarray(Image.open(f)) for f in (tmp_path / "samples.png" / "sample_0.png", prompt_image))
    assert completed.shape == (8, 8, 3) and np.array_equal(completed[:4], original[:4])
    import soundfile

    waveform, rate = soundfile.read(tmp_path / "samples.wav" / "sample_0.wav")
    assert rate == 8000 and len(waveform) == 32  # seq_len 64 bytes of 16-bit samples


def imported_modules(path: Path) -> set[str]:
    """The top-level names of the modules that ``path`` imports (relative imports left out)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


def test_imports_run_one_way():
    """megabyte, datamodules <- sampling <- callbacks <- cli: sampling is shared by the callback and
    ``cli.py generate``, and no library module imports the CLI."""
    assert not imported_modules(REPO / "sampling.py") & {"cli", "callbacks"}
    for path in sorted((REPO / "callbacks").glob("*.py")):
        assert "cli" not in imported_modules(path), path
    for path in sorted([*(REPO / "megabyte").rglob("*.py"), *(REPO / "datamodules").rglob("*.py")]):
        assert not imported_modules(path) & {"cli", "sampling", "callbacks"}, path
