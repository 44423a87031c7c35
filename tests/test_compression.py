"""``compress`` / ``decompress``: round trips, chunk and batch boundaries, the file's checks, the coder's
length against the model's bits, media, and the command in processes of its own."""

import io
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import megabyte
from cli import main
from datamodules.audio.codec import encode_waveform
from megabyte.bits import byte_bits
from megabyte.compression import coded_bits, model_hash, read_header
from megabyte.config import config_to_dict
from megabyte.pretrained import Pretrained
from tests.audio_files import sine
from tests.conftest import REPO, tiny_megabyte_config, tiny_transformer_config
from tests.image_files import random_pixels

TEXT = {"class_path": "datamodules.TextDataModule", "init_args": {"path": "corpus.txt", "seq_len": 64}}
SOURCE = (REPO / "megabyte" / "model.py").read_bytes()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run fastest on one thread; the processes the tests start get one too (OMP_NUM_THREADS)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained(model: torch.nn.Module, steps: int = 40) -> torch.nn.Module:
    """``model`` after a few Adam steps on this repository's source: probabilities far from uniform."""
    torch.manual_seed(0)
    windows = torch.tensor(list(SOURCE[: 16 * 64])).view(16, 64)  # (16, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = byte_bits(model(windows), windows).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def text_model() -> Pretrained:
    torch.manual_seed(0)
    return Pretrained(trained(megabyte.MegaByte(tiny_megabyte_config())), TEXT)


@pytest.fixture(scope="module")
def transformer_model() -> Pretrained:
    torch.manual_seed(0)
    return Pretrained(megabyte.ByteTransformer(tiny_transformer_config()), TEXT)


@pytest.fixture(scope="module")
def saved_models(text_model, tmp_path_factory) -> dict[str, Path]:
    """The text model as a Lightning-style checkpoint (.ckpt) and as an exported folder; another model's folder."""
    folder = tmp_path_factory.mktemp("models")
    ckpt = folder / "model.ckpt"
    torch.save(
        {
            "hyper_parameters": {"arch": config_to_dict(text_model.config)},
            "state_dict": {f"model.{k}": v for k, v in text_model.model.state_dict().items()},
            "datamodule_hyper_parameters": {"_class_path": TEXT["class_path"], **TEXT["init_args"]},
        },
        ckpt,
    )
    torch.manual_seed(1)
    other = Pretrained(megabyte.MegaByte(tiny_megabyte_config()), TEXT).export(folder / "other")
    return {"ckpt": ckpt, "exported": text_model.export(folder / "exported"), "other": other}


# -- round trips ------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(data=st.binary(max_size=150))
def test_random_bytes_round_trip(text_model, data):
    blob = text_model.compress(data, chunk_len=16, batch_size=3)
    assert text_model.decompress(blob) == data


@settings(max_examples=10, deadline=None)
@given(unit=st.binary(min_size=1, max_size=12), repeats=st.integers(1, 20), tail=st.binary(max_size=5))
def test_structured_bytes_round_trip(text_model, unit, repeats, tail):
    data = unit * repeats + tail
    blob = text_model.compress(data, chunk_len=32, batch_size=4)
    assert text_model.decompress(blob) == data


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff", b"a"])
def test_empty_and_one_byte_files_round_trip(text_model, data):
    blob = text_model.compress(data)
    header = read_header(blob)
    assert header.length == len(data) and header.crc32 == zlib.crc32(data) and header.mode == "raw"
    assert len(header.stream_words) == len(data)  # one chunk, one batch, one stream a byte; none for nothing
    assert text_model.decompress(blob) == data


@pytest.mark.parametrize("which", ["megabyte", "transformer"])
def test_every_chunk_and_batch_boundary_round_trips(which, text_model, transformer_model):
    model = text_model if which == "megabyte" else transformer_model
    chunk = 8
    for k in (1, 2, 3, 5):
        for n in (k * chunk - 1, k * chunk, k * chunk + 1):
            data = SOURCE[1000 : 1000 + n]
            for batch_size in (1, 2, 64):  # fewer chunks a batch than the file has, and more
                blob = model.compress(data, chunk_len=chunk, batch_size=batch_size)
                header = read_header(blob)
                assert (header.chunk_len, header.batch_size, header.length) == (chunk, batch_size, n)
                assert len(header.stream_words) == -(-(-(-n // chunk)) // batch_size)  # ceil(ceil(n / chunk) / batch)
                assert model.decompress(blob) == data, (k, n, batch_size)


def test_the_default_chunk_is_the_models_context_and_long_files_span_many_batches(text_model):
    data = SOURCE[: 64 * 5 + 7]
    chunks = []
    blob = text_model.compress(data, batch_size=2, progress=chunks.append)
    header = read_header(blob)
    assert header.chunk_len == text_model.config.max_seq_len == 64
    assert len(header.stream_words) == 3  # 6 chunks, 2 a batch
    assert sum(chunks) == len(data)  # the progress callback counts every byte once
    assert text_model.decompress(blob) == data


# -- what it costs: the coder against the model's bits --------------------------------------------------------


def test_the_coded_length_is_the_models_bits_plus_a_few_bytes(text_model):
    data = SOURCE[2000:4000]
    chunk, batch_size = 64, 8
    blob = text_model.compress(data, chunk_len=chunk, batch_size=batch_size)
    header = read_header(blob)
    payload_bits = 8 * (len(blob) - header.size)
    bits = coded_bits(text_model, data, chunk_len=chunk, batch_size=batch_size)
    # the range coder: the ideal -log2 p, its 24-bit quantisation, and at most two 32-bit words a stream to end it
    assert bits <= payload_bits <= bits * 1.001 + 64 * len(header.stream_words)
    assert payload_bits < 0.8 * 8 * len(data)  # the trained model compresses its own source
    # the decode steps give the parallel forward pass's probabilities up to float rounding
    x = torch.tensor(list(data[: len(data) // chunk * chunk])).view(-1, chunk)
    with torch.no_grad():
        forward_bits = byte_bits(text_model.model(x), x).double().sum().item()
    assert coded_bits(text_model, data[: x.numel()], chunk_len=chunk) == pytest.approx(forward_bits, rel=1e-5)


def test_the_batch_size_changes_speed_not_the_bytes_coded(text_model):
    data = SOURCE[:500]
    sizes = {}
    for batch_size in (1, 3, 16):
        blob = text_model.compress(data, chunk_len=32, batch_size=batch_size)
        assert text_model.decompress(blob) == data
        sizes[batch_size] = len(blob) - read_header(blob).size
    # one stream a batch: a few bytes of flush each, otherwise the same probabilities
    assert max(sizes.values()) - min(sizes.values()) <= 8 * 16


# -- refusals ---------------------------------------------------------------------------------------------------


def test_a_damaged_truncated_or_foreign_file_is_refused_with_one_error(text_model, saved_models):
    data = SOURCE[:300]
    blob = text_model.compress(data, chunk_len=32, batch_size=4)
    header = read_header(blob)
    corrupted = bytearray(blob)
    corrupted[header.size + 3] ^= 0x80  # the top bit of the first 32-bit word: the first bytes decode otherwise
    with pytest.raises(ValueError, match="^corrupted: "):
        text_model.decompress(bytes(corrupted))
    damaged_header = bytearray(blob)
    damaged_header[20] ^= 1  # inside the original length
    with pytest.raises(ValueError, match="^corrupted: the header fails its CRC32$"):
        text_model.decompress(bytes(damaged_header))
    with pytest.raises(ValueError, match="^truncated: "):
        text_model.decompress(blob[:-1])
    with pytest.raises(ValueError, match="^truncated: "):
        text_model.decompress(blob[: header.size - 3])
    with pytest.raises(ValueError, match="bytes more than the header says"):
        text_model.decompress(blob + b"\0\0\0\0")
    with pytest.raises(ValueError, match=r"^not a file written by megabyte compress \(bad magic\)$"):
        text_model.decompress(b"PK\x03\x04" + blob[4:])
    other = megabyte.load(saved_models["other"], device="cpu")
    with pytest.raises(ValueError, match="^compressed with another model"):
        other.decompress(blob)
    # the same weights in another dtype compute other probabilities: another model
    half = Pretrained(megabyte.build_model(text_model.config), TEXT)
    half.model.load_state_dict(text_model.model.state_dict())
    half.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="^compressed with another model"):
        half.decompress(blob)


def test_bad_options_are_refused(text_model):
    with pytest.raises(ValueError, match=r"chunk_len must be in 1\.\.64"):
        text_model.compress(b"abc", chunk_len=65)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        text_model.compress(b"abc", batch_size=0)


# -- media ------------------------------------------------------------------------------------------------------


def image_model(tmp_path: Path) -> Pretrained:
    torch.manual_seed(0)
    data = {"class_path": "datamodules.ImageDataModule", "init_args": {"path": str(tmp_path), "image_size": 4, "channels": 3}}
    return Pretrained(megabyte.build_model(tiny_megabyte_config(max_seq_len=48)), data)


def audio_model(tmp_path: Path, encoding: str) -> Pretrained:
    torch.manual_seed(0)
    init_args = {"path": str(tmp_path), "seq_len": 64, "sample_rate": 8000, "encoding": encoding}
    return Pretrained(megabyte.build_model(tiny_megabyte_config()), {"class_path": "datamodules.AudioDataModule", "init_args": init_args})


def png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> a PNG file's bytes, as Pillow writes it."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_image_file_is_coded_as_pixels_only_where_that_gives_the_file_back(tmp_path):
    model = image_model(tmp_path)
    pixels = random_pixels(1, 4, 4, 3)[0]  # (4, 4, 3)
    same = model.datamodule.save(pixels.reshape(-1), tmp_path / "same").read_bytes()  # the DataModule's own PNG
    blob = model.compress(same)
    header = read_header(blob)
    assert header.mode == "medium" and header.length == 48 and header.output_length == len(same)
    assert model.decompress(blob) == same  # the file itself, from its 48 pixel bytes

    larger = png(random_pixels(1, 8, 8, 3, seed=1)[0])  # another size: its pixels are resized
    blob = model.compress(larger)
    assert read_header(blob).mode == "raw" and model.decompress(blob) == larger
    blob = model.compress(larger, medium=True)
    header = read_header(blob)
    assert header.mode == "medium" and header.length == 48
    written, source = tmp_path / "written.png", tmp_path / "larger.png"
    written.write_bytes(model.decompress(blob))
    source.write_bytes(larger)
    pixels_coded = model.datamodule.encode_file(source)  # (48,) the resized image's bytes
    assert Image.open(written).size == (4, 4) and model.datamodule.encode_file(written).tolist() == pixels_coded.tolist()

    not_an_image = b"just some text, not a picture"
    blob = model.compress(not_an_image)
    assert read_header(blob).mode == "raw" and model.decompress(blob) == not_an_image
    with pytest.raises(ValueError, match=r"^not a file of the model's medium \(image\)"):
        model.compress(not_an_image, medium=True)
    assert read_header(model.compress(same, medium=False)).mode == "raw"


def test_a_recording_is_coded_as_samples_only_where_that_loses_nothing(tmp_path):
    pcm16 = audio_model(tmp_path, "pcm16")
    samples = encode_waveform(torch.from_numpy(sine(440, 0.01, 8000)), "pcm16")  # 80 samples, 160 bytes
    wav = pcm16.datamodule.save(samples, tmp_path / "a").read_bytes()  # the DataModule's own WAV
    blob = pcm16.compress(wav)
    header = read_header(blob)
    assert header.mode == "medium" and header.length == 160  # 80 samples of 2 bytes, without the WAV header
    assert pcm16.decompress(blob) == wav

    mulaw = audio_model(tmp_path, "mulaw")  # 8 bits a sample: this file's 16-bit samples do not survive
    blob = mulaw.compress(wav)
    assert read_header(blob).mode == "raw" and mulaw.decompress(blob) == wav
    blob = mulaw.compress(wav, medium=True)
    header = read_header(blob)
    assert header.mode == "medium" and header.length == 80
    written = tmp_path / "written.wav"
    written.write_bytes(mulaw.decompress(blob))
    source = tmp_path / "source.wav"
    source.write_bytes(wav)
    assert mulaw.datamodule.encode_file(written).tolist() == mulaw.datamodule.encode_file(source).tolist()


def test_text_is_coded_as_it_is_whatever_medium_says(text_model):
    for medium in (None, True, False):
        blob = text_model.compress(b"plain text", medium=medium)
        assert read_header(blob).mode == "raw" and text_model.decompress(blob) == b"plain text"


# -- the command --------------------------------------------------------------------------------------------------


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as this process computes (one_thread)
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_compress_and_decompress_in_processes_of_their_own_give_the_file_back(text_model, saved_models, tmp_path):
    original = tmp_path / "in.py"
    original.write_bytes(SOURCE[:3000])
    done = command("compress", "--ckpt_path", str(saved_models["ckpt"]), "in.py", "in.mbz", "--chunk_len", "48",
                   "--batch_size", "16", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (summary,) = done.stdout.splitlines()
    size = (tmp_path / "in.mbz").stat().st_size
    assert summary.startswith(f"compressed in.py (3,000 bytes) to in.mbz ({size:,} bytes): coded its bytes, ")
    assert f"{8 * size / 3000:.4f} bits per byte" in summary and "(chunk_len 48, batch_size 16)" in summary
    # the exported folder is the same model: it decompresses what the checkpoint compressed
    done = command("decompress", "--ckpt_path", str(saved_models["exported"]), "in.mbz", "out.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.py").read_bytes() == original.read_bytes()
    # and this process's model, through the Python API, reads the command's file; its file, the command
    assert text_model.decompress((tmp_path / "in.mbz").read_bytes()) == original.read_bytes()
    (tmp_path / "api.mbz").write_bytes(text_model.compress(SOURCE[3000:4100], chunk_len=64, batch_size=5))
    done = command("decompress", "--ckpt_path", str(saved_models["ckpt"]), "api.mbz", "api.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "api.py").read_bytes() == SOURCE[3000:4100]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.mbz", "api.py", "in.mbz", "in.py", "out.py"]


def refused(capsys, *args: str) -> str:
    """The one ``error:`` line of a command that exits 2."""
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    assert exit.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_the_command_refuses_a_damaged_truncated_or_foreign_file_and_writes_nothing(text_model, saved_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt, other = str(saved_models["ckpt"]), str(saved_models["other"])
    blob = text_model.compress(SOURCE[:200], chunk_len=32, batch_size=2)
    header = read_header(blob)
    files = {
        "good.mbz": blob,
        "corrupted.mbz": blob[: header.size + 3] + bytes([blob[header.size + 3] ^ 0x80]) + blob[header.size + 4 :],
        "truncated.mbz": blob[: len(blob) - 4],
    }
    for name, content in files.items():
        Path(name).write_bytes(content)
    assert refused(capsys, "decompress", "--ckpt_path", ckpt, "corrupted.mbz", "out").startswith("error: corrupted: ")
    assert refused(capsys, "decompress", "--ckpt_path", ckpt, "truncated.mbz", "out").startswith("error: truncated: ")
    assert refused(capsys, "decompress", "--ckpt_path", other, "good.mbz", "out").startswith("error: compressed with another model")
    assert refused(capsys, "decompress", "--ckpt_path", ckpt, "missing.mbz", "out") == "error: missing.mbz: no such file"
    assert refused(capsys, "compress", "--ckpt_path", ckpt, "good.mbz", "again", "--chunk_len", "0").startswith(
        "error: chunk_len must be in 1..64"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no OUT, no partial file
    assert refused(capsys, "compress", "--ckpt_path", ckpt, "good.mbz", "truncated.mbz") == (
        "error: truncated.mbz exists: give a new file name for the output, or remove it"
    )
    assert Path("truncated.mbz").read_bytes() == files["truncated.mbz"]
    main(["decompress", "--ckpt_path", ckpt, "good.mbz", "out"])
    assert Path("out").read_bytes() == SOURCE[:200]


def test_the_model_hash_follows_the_weights(text_model):
    model = megabyte.build_model(text_model.config)
    model.load_state_dict(text_model.model.state_dict())
    assert model_hash(model) == model_hash(text_model.model)  # the same weights: the same model
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0  # written in place: read again, not taken from the cache
    assert model_hash(model) != model_hash(text_model.model)
    assert model_hash(text_model.model, {"class_path": "datamodules.ImageDataModule"}) != model_hash(text_model.model)
