"""The Python API (``megabyte.load``), ``export`` and the ``megabyte`` command's own parts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import megabyte
from cli import config_names, configs_dir, main
from megabyte.pretrained import Pretrained
from tests.conftest import REPO, tiny_megabyte_config, tiny_transformer_config
from tests.test_cli import tiny_args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny quickstart model, trained 4 steps through the CLI."""
    tmp_path = tmp_path_factory.mktemp("run")
    text = tmp_path / "text.txt"
    text.write_bytes((REPO / "megabyte" / "model.py").read_bytes())
    main(["fit", *tiny_args(REPO / "configs" / "quickstart.yaml", text, tmp_path), "--trainer.max_steps=4",
          "--trainer.max_time=null", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"])  # fmt: skip
    (last,) = tmp_path.rglob("last.ckpt")
    return last


def test_load_gives_a_ready_model_that_generates_bytes_from_bytes_str_and_files(checkpoint, tmp_path):
    model = megabyte.load(checkpoint, device="cpu")
    assert isinstance(model, Pretrained) and not model.model.training and model.medium == "text"
    out = model.generate(b"def f(", max_new_bytes=12, temperature=0.0)
    assert isinstance(out, bytes) and len(out) == 6 + 12 and out.startswith(b"def f(")
    assert model.generate("def f(", max_new_bytes=12, temperature=0.0) == out
    prompt = tmp_path / "prompt.py"
    prompt.write_bytes(b"def f(")
    assert model.generate(prompt, max_new_bytes=12, temperature=0.0) == out
    assert isinstance(model.decode(out), str)
    # seeded sampling repeats itself
    assert model.generate(b"x", 20, seed=3) == model.generate(b"x", 20, seed=3)


def test_a_too_long_prompt_is_refused_unless_it_is_a_file_the_medium_cuts(checkpoint, tmp_path):
    model = megabyte.load(checkpoint, device="cpu")
    T = model.config.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(b"a" * T, max_new_bytes=1)
    with pytest.raises(ValueError, match="max_new_bytes"):
        model.generate(b"", max_new_bytes=T + 1)
    long_file = tmp_path / "long.txt"
    long_file.write_bytes(b"b" * T + b"END")
    out = model.generate(long_file, max_new_bytes=4, temperature=0.0)
    assert len(out) == T and out[: T - 4].endswith(b"END")  # text keeps the prompt's last bytes


def test_bits_matches_the_bits_of_a_forward_pass(checkpoint):
    model = megabyte.load(checkpoint, device="cpu")
    T = model.config.max_seq_len
    data = (bytes(range(256)) * 8)[: 2 * T + T // 2]  # two full windows and a short one
    x = torch.tensor(list(data))
    with torch.no_grad():
        bits = [megabyte.bits.byte_bits(model.model(w[None]), w[None]).sum() for w in x.split(T)]
    assert model.bits(data) == pytest.approx(float(sum(bits)) / len(data), rel=1e-6)
    assert model.bits(data, batch_size=1) == pytest.approx(model.bits(data), rel=1e-6)  # float32: batching changes the summation order
    assert model.bits(data, strided=True) != model.bits(data)


def test_export_then_load_gives_the_same_greedy_bytes_without_the_optimizer_state(checkpoint, tmp_path):
    model = megabyte.load(checkpoint, device="cpu")
    folder = megabyte.export(checkpoint, tmp_path / "exported")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["arch"]["class_path"] == "megabyte.MegaByteConfig" and config["data"]["class_path"] == "datamodules.TextDataModule"
    assert (folder / "model.safetensors").stat().st_size < checkpoint.stat().st_size / 2
    again = megabyte.load(folder, device="cpu")
    prompt = b"import torch\n"
    assert again.generate(prompt, 16, temperature=0.0) == model.generate(prompt, 16, temperature=0.0)
    assert again.bits(prompt * 10) == model.bits(prompt * 10)
    half = model.export(tmp_path / "bf16", dtype="bfloat16")
    assert (half / "model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size * 0.6
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(megabyte.load(half, device="cpu", dtype="bfloat16").model.parameters()).dtype == torch.bfloat16


def test_export_refuses_a_folder_that_holds_other_files(checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        megabyte.export(checkpoint, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_load_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        megabyte.load(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="no config.json"):
        megabyte.load(tmp_path)
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        megabyte.load(tmp_path / "junk.ckpt")


def test_decode_gives_the_medium(tmp_path):
    image = Pretrained(
        megabyte.build_model(tiny_transformer_config(max_seq_len=48)),
        {"class_path": "datamodules.ImageDataModule", "init_args": {"path": str(tmp_path), "image_size": 4, "channels": 3}},
    )
    picture = image.decode(bytes(range(48)))
    assert isinstance(picture, Image.Image) and picture.size == (4, 4) and picture.mode == "RGB"
    assert picture.getpixel((0, 0)) == (0, 1, 2)
    audio = Pretrained(
        megabyte.build_model(tiny_megabyte_config()),
        {"class_path": "datamodules.AudioDataModule", "init_args": {"path": str(tmp_path), "seq_len": 64, "sample_rate": 8000}},
    )
    waveform, rate = audio.decode(bytes([128] * 10))
    assert rate == 8000 and waveform.shape == (5,)  # pcm16: two bytes a sample


def test_the_export_command_writes_the_folder_and_refuses_bad_input_in_one_line(checkpoint, tmp_path):
    def command(*args):
        return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=tmp_path)

    done = command("export", str(checkpoint), "out")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    missing = command("export", "nope.ckpt", "out2")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert [l for l in missing.stderr.splitlines() if l.startswith("error:")] == [
        "error: nope.ckpt: no such checkpoint file or exported folder"
    ]
    assert not (tmp_path / "out2").exists()
    dtype = command("export", str(checkpoint), "out3", "--dtype", "int8")
    assert dtype.returncode == 2 and "error: dtype must be one of float32, bfloat16, float16" in dtype.stderr


def test_a_shipped_config_is_found_by_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quickstart = str(configs_dir() / "quickstart.yaml")
    assert config_names(["fit", "--config", "quickstart"]) == ["fit", "--config", quickstart]
    assert config_names(["fit", "--config=quickstart.yaml"]) == ["fit", f"--config={quickstart}"]
    assert config_names(["fit", "-c", "image/mnist"]) == ["fit", "-c", str(configs_dir() / "image" / "mnist.yaml")]
    # a file of that name in the working folder wins; an unknown name is left for the parser to refuse
    (tmp_path / "quickstart").write_text("seed_everything: 1\n")
    assert config_names(["fit", "--config", "quickstart"]) == ["fit", "--config", "quickstart"]
    assert config_names(["fit", "--config", "nothing-like-it"]) == ["fit", "--config", "nothing-like-it"]


def test_push_to_hub_then_load_from_the_hub_gives_the_same_bytes(checkpoint, tmp_path, monkeypatch):
    """The Hub's two calls replaced by a local folder: nothing reaches the network."""
    huggingface_hub = pytest.importorskip("huggingface_hub")  # the hub extra (make install has it)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"
    calls = []

    class LocalHub:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            calls.append(("create_repo", repo_id, repo_type, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            (hub / repo_id).mkdir(parents=True)
            for file in Path(folder_path).iterdir():
                (hub / repo_id / file.name).write_bytes(file.read_bytes())
            return f"https://huggingface.co/{repo_id}/commit/0"

    def snapshot_download(repo_id, revision, allow_patterns):
        calls.append(("snapshot_download", repo_id, revision, tuple(allow_patterns)))
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", LocalHub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = megabyte.load(checkpoint, device="cpu")
    assert model.push_to_hub("someone/tiny", dtype="bfloat16") == "https://huggingface.co/someone/tiny/commit/0"
    assert sorted(p.name for p in (hub / "someone" / "tiny").iterdir()) == ["config.json", "model.safetensors"]
    shared = megabyte.load("hf://someone/tiny@v1", device="cpu")
    assert calls == [("create_repo", "someone/tiny", "model", True),
                     ("snapshot_download", "someone/tiny", "v1", ("config.json", "model.safetensors"))]  # fmt: skip
    assert next(shared.model.parameters()).dtype == torch.float32  # bf16 weights, loaded as float32
    local = megabyte.load(model.export(tmp_path / "bf16", dtype="bfloat16"), device="cpu")
    assert shared.generate(b"def ", 16, temperature=0) == local.generate(b"def ", 16, temperature=0)
