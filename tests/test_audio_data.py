import io
import json
import re
import tarfile
import warnings
import wave

import lightning as L
import numpy as np
import pytest
import soundfile
import torch

import datamodules.audio.datamodule
from datamodules.audio import AudioDataModule, mulaw_to_waveform, pcm16_to_waveform, waveform_to_mulaw, waveform_to_pcm16
from datamodules.audio.sources import wav_missing_bytes
from datamodules.audio.splits import assign_splits
from datamodules.base import SPLITS
from datamodules.windows import RandomWindows
from megabyte import MegaByteLM
from tests.audio_files import FSDD_TEST_PATTERN, fsdd_name, sine, write_tar, write_wav_folder
from tests.conftest import tiny_megabyte_config


def make_dm(path, tmp_path, **kwargs) -> AudioDataModule:
    kwargs = {"seq_len": 32, "batch_size": 4, "num_workers": 0, "sample_rate": 8000, **kwargs}
    dm = AudioDataModule(str(path), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def file_waveforms(dm: AudioDataModule) -> dict[str, torch.Tensor]:
    """Every file's decoded waveform, cut out of its split by the byte counts in ``dm.files``."""
    waveforms = {}
    for split in SPLITS:
        offset = 0
        for name, n_bytes in dm.files[split].items():
            waveforms[name], _ = dm.decode(dm.splits[split][offset : offset + n_bytes])
            offset += n_bytes
        assert offset == len(dm.splits[split])  # a split is exactly its files, back to back
    return waveforms


def wav_bytes(waveform: np.ndarray, sample_rate: int = 8000) -> bytes:
    """A mono 16-bit PCM WAV file holding ``waveform``, in memory."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(waveform_to_pcm16(waveform).tobytes())
    return buffer.getvalue()


# -- waveform <-> bytes -----------------------------------------------------------------------


def test_pcm16_known_bytes():
    waveform = torch.tensor([0.0, 256 / 32768, -1.0, 1.0, 3.0, -3.0])  # out of range: clipped
    assert waveform_to_pcm16(waveform).tolist() == [0, 0, 0, 1, 0, 0x80, 0xFF, 0x7F, 0xFF, 0x7F, 0, 0x80]
    assert pcm16_to_waveform(bytes([0, 0, 0, 1, 0, 0x80, 0xFF, 0x7F])).tolist() == [0, 256 / 32768, -1, 32767 / 32768]


def test_pcm16_bytes_round_trip_exactly():
    every_sample = np.arange(-32768, 32768).astype("<i2").view(np.uint8)
    waveform = pcm16_to_waveform(every_sample)
    assert waveform.dtype == torch.float32 and waveform.shape == (65536,)
    assert waveform.min() == -1.0 and waveform.max() == 32767 / 32768
    assert np.array_equal(waveform_to_pcm16(waveform), every_sample)


def test_pcm16_waveform_round_trip_within_one_step():
    waveform = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = waveform_to_pcm16(waveform)
    assert data.dtype == np.uint8 and data.shape == (20_000,)
    assert (pcm16_to_waveform(data) - waveform).abs().max() <= 1 / 32768


def test_mulaw_round_trip_within_one_quantization_step():
    levels = mulaw_to_waveform(np.arange(256, dtype=np.uint8))
    assert levels[0] == -1.0 and levels[-1] == 1.0 and (levels.diff() > 0).all()
    assert np.array_equal(waveform_to_mulaw(levels), np.arange(256))  # codes -> waveform -> codes is exact

    waveform = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = torch.from_numpy(waveform_to_mulaw(waveform).astype(np.int64))
    assert codes.shape == (10_000,)
    # Every sample decodes to a level whose neighbours enclose it: within one quantization step.
    below, above = levels[(codes - 1).clamp(min=0)], levels[(codes + 1).clamp(max=255)]
    assert ((below <= waveform) & (waveform <= above)).all()
    assert torch.equal(mulaw_to_waveform(codes.numpy().astype(np.uint8)), levels[codes])
    assert waveform_to_mulaw(np.array([-5.0, np.nan, 5.0])).tolist() == [0, 128, 255]


@pytest.mark.parametrize("encoding", ["pcm16", "mulaw"])
def test_decode_and_save_never_raise_on_any_bytes(encoding, tmp_path):
    dm = AudioDataModule("unused", seq_len=32, sample_rate=11025, encoding=encoding)
    rng = np.random.default_rng(0)
    for n in [0, 1, 2, 3, 7, 64, 101]:
        data = rng.integers(0, 256, n, dtype=np.uint8)
        for container in (data, bytes(data), torch.from_numpy(data)):
            waveform, sample_rate = dm.decode(container)
            assert sample_rate == 11025 and waveform.dtype == torch.float32
            assert waveform.shape == (n // 2 if encoding == "pcm16" else n,)
            assert (waveform.abs() <= 1).all()
        saved = dm.save(data, tmp_path / f"sample_{n}.png")
        assert saved == tmp_path / f"sample_{n}.wav"
        with wave.open(str(saved)) as f:
            assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 11025)
            assert f.getnframes() == len(waveform)


def test_saved_wav_holds_the_pcm16_bytes_exactly(tmp_path):
    dm = AudioDataModule("unused", seq_len=32, sample_rate=8000)
    data = np.random.default_rng(0).integers(0, 256, 1001, dtype=np.uint8)
    with wave.open(str(dm.save(data, tmp_path / "x"))) as f:
        assert f.readframes(f.getnframes()) == data[:1000].tobytes()  # the odd last byte is dropped


# -- files -> bytes ---------------------------------------------------------------------------


def test_every_format_loads_as_mono_at_the_configured_rate(tmp_path):
    folder = tmp_path / "formats"
    folder.mkdir()
    tone = sine(440, 0.25, 8000)  # 2,000 samples at 8 kHz
    for subtype in ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"):
        soundfile.write(folder / f"{subtype.lower()}.wav", tone, 8000, subtype=subtype)
    soundfile.write(folder / "pcm_16.flac", tone, 8000)
    other = sine(1000, 0.25, 8000, amplitude=0.3)
    soundfile.write(folder / "stereo.wav", np.stack([tone + other, tone - other], axis=1), 8000)  # mean: tone
    for rate in (4000, 16000, 44100):
        soundfile.write(folder / f"rate_{rate}.wav", sine(440, 0.25, rate), rate, subtype="FLOAT")
    dm = make_dm(folder, tmp_path, val_pattern="stereo", test_pattern="flac$")
    waveforms = file_waveforms(dm)
    assert len(waveforms) == 11
    for name, waveform in waveforms.items():
        assert waveform.shape == (2000,), name
        error = (waveform - torch.from_numpy(tone))[50:-50].abs().max()  # resampling disturbs the ends
        assert error < 0.01, f"{name}: {error}"


def test_mulaw_encoding_is_one_byte_a_sample(tmp_path):
    folder = write_wav_folder(tmp_path / "wavs", n=6)
    pcm16 = make_dm(folder, tmp_path, split=(0.5, 0.25, 0.25))
    mulaw = make_dm(folder, tmp_path, split=(0.5, 0.25, 0.25), encoding="mulaw", seq_len=33)
    assert [len(mulaw.splits[s]) * 2 for s in SPLITS] == [len(pcm16.splits[s]) for s in SPLITS]
    reference = file_waveforms(pcm16)
    for name, waveform in file_waveforms(mulaw).items():
        assert (waveform - reference[name]).abs().max() < 0.02  # at amplitude 0.5 the steps are < 0.016


def test_wav_missing_bytes():
    raw = wav_bytes(sine(440, 0.1, 8000))
    assert wav_missing_bytes(raw) == 0
    assert wav_missing_bytes(raw[:-100]) == 100
    assert wav_missing_bytes(b"not a wav file") == 0


def test_tar_archives_give_the_folders_bytes(tmp_path):
    folder = write_wav_folder(tmp_path / "wavs")
    expected = make_dm(folder, tmp_path, test_pattern=FSDD_TEST_PATTERN)
    for archive in ("fsdd.tar", "fsdd.tar.gz"):
        dm = make_dm(write_tar(folder, tmp_path / archive), tmp_path, test_pattern=FSDD_TEST_PATTERN)
        assert list(dm.files["test"]) == ["fsdd/recordings/0_george_0.wav", "fsdd/recordings/1_jackson_3.wav"]
        for s in SPLITS:
            assert bytes(dm.splits[s]) == bytes(expected.splits[s])


# -- splits by file ---------------------------------------------------------------------------


def test_split_by_pattern(tmp_path):
    folder = write_wav_folder(tmp_path / "wavs", n=30)
    dm = make_dm(folder, tmp_path, test_pattern=FSDD_TEST_PATTERN, split=(0.8, 0.2, 0.0))
    names = sorted(fsdd_name(i) for i in range(30))
    assert sorted(dm.files["test"]) == ["0_george_0.wav", "1_jackson_3.wav", "7_lucas_1.wav", "8_george_4.wav"]
    assert len(dm.files["val"]) == round(26 * 0.2)
    assert sorted(name for s in SPLITS for name in dm.files[s]) == names  # every file in exactly one split
    assert all(len(dm.splits[s]) == 4000 * len(dm.files[s]) for s in SPLITS)

    dm = make_dm(folder, tmp_path, test_pattern=FSDD_TEST_PATTERN, val_pattern="_lucas_")
    assert sorted(dm.files["test"]) == ["0_george_0.wav", "1_jackson_3.wav", "7_lucas_1.wav", "8_george_4.wav"]
    assert "7_lucas_1.wav" not in dm.files["val"]  # test_pattern wins a name both patterns match
    assert sorted(dm.files["val"]) == sorted(n for n in names if "_lucas_" in n and n != "7_lucas_1.wav")
    assert sorted(dm.files["train"]) == sorted(set(names) - set(dm.files["test"]) - set(dm.files["val"]))


def test_split_by_seeded_fractions():
    names = [fsdd_name(i) for i in range(100)]
    a = assign_splits(names, (0.8, 0.1, 0.1), seed=0)
    assert [len(a[s]) for s in SPLITS] == [80, 10, 10]
    assert sorted(n for s in SPLITS for n in a[s]) == sorted(names)
    assert all(a[s] == [n for n in names if n in a[s]] for s in SPLITS)  # each split keeps the files' order
    assert assign_splits(names, (0.8, 0.1, 0.1), seed=0) == a
    assert assign_splits(names, (0.8, 0.1, 0.1), seed=1)["val"] != a["val"]
    # A split with a pattern ignores its fraction; the others share the rest in proportion.
    b = assign_splits(names, (0.9, 0.05, 0.05), seed=0, test_pattern=FSDD_TEST_PATTERN)
    assert len(b["test"]) == 10 and len(b["val"]) == round(90 * 0.05 / 0.95)
    # A positive fraction gets at least one file.
    assert [len(s) for s in assign_splits(names[:3], (0.9, 0.05, 0.05), seed=0).values()] == [1, 1, 1]


def test_split_errors():
    names = [fsdd_name(i) for i in range(10)]
    with pytest.raises(ValueError, match=r"test_pattern 'nothing' matches none of the 10 file names"):
        assign_splits(names, (0.9, 0.05, 0.05), seed=0, test_pattern="nothing")
    with pytest.raises(ValueError, match="the test split gets no files: give it a positive fraction in split, or a"):
        assign_splits(names, (0.9, 0.1, 0.0), seed=0)
    with pytest.raises(ValueError, match="no file is left for the train split"):
        assign_splits(names, (0.9, 0.05, 0.05), seed=0, test_pattern=".")


def test_train_windows_start_on_sample_boundaries(tmp_path):
    dm = make_dm(write_wav_folder(tmp_path / "wavs"), tmp_path, split=(0.5, 0.25, 0.25), seq_len=64)
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, RandomWindows) and loader.dataset.step == 2
    starts = [2 * i for i in dm.train_dataloader().sampler]  # the same seeded draw as loader's
    windows = torch.cat([x for x, _ in loader])
    assert len(windows) == len(starts) // 4 * 4 == len(dm.splits["train"]) // 64 // 4 * 4  # drop_last
    train = dm.splits["train"]
    for start, window in zip(starts, windows):
        assert np.array_equal(window.numpy(), train[start : start + 64])
    assert len({tuple(w.tolist()) for w in windows}) > 1
    torch.testing.assert_close(torch.cat([x for x, _ in dm.train_dataloader()]), windows)  # seeded


@pytest.mark.parametrize("stage", ["val", "test"])
def test_eval_windows_cover_every_byte_exactly_once(tmp_path, stage):
    dm = make_dm(write_wav_folder(tmp_path / "wavs"), tmp_path, split=(0.5, 0.25, 0.25), batch_size=3, seq_len=46)
    loader = dm.val_dataloader() if stage == "val" else dm.test_dataloader()
    pieces = [row[keep].numpy() for x, mask in loader for row, keep in zip(x, mask)]
    assert len(pieces[-1]) < 46  # a short last window
    assert np.concatenate(pieces).tobytes() == bytes(dm.splits[stage])


# -- bad input --------------------------------------------------------------------------------


def write_bad_files(folder):
    (folder / "corrupt.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (folder / "truncated.wav").write_bytes(wav_bytes(sine(440, 0.1, 8000))[:-101])
    (folder / "silence.wav").write_bytes(wav_bytes(np.zeros(0)))  # a valid WAV without samples
    (folder / "notes.txt").write_text("recorded in 2024\n")
    soundfile.write(folder / "nan.wav", np.full(100, np.nan, dtype=np.float32), 8000, subtype="FLOAT")
    return {"corrupt.wav": "not a readable audio file", "truncated.wav": "truncated", "silence.wav": "no samples",
            "notes.txt": "not a readable audio file", "nan.wav": "non-finite"}  # fmt: skip


def test_bad_files_are_skipped_with_one_warning_each(tmp_path):
    folder = write_wav_folder(tmp_path / "wavs")
    bad = write_bad_files(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = make_dm(folder, tmp_path, test_pattern=FSDD_TEST_PATTERN)
    messages = [str(w.message) for w in caught]
    for name, reason in bad.items():
        (message,) = [m for m in messages if repr(name) in m]
        assert reason in message and "skipping audio file" in message
    assert len(messages) == len(bad)
    assert sorted(n for s in SPLITS for n in dm.files[s]) == sorted(fsdd_name(i) for i in range(12))
    assert "'corrupt.wav' in" in messages[0] and "(libsndfile: Format not recognised)" in messages[0]
    truncated = f"skipping audio file 'truncated.wav' in {str(folder)!r}: truncated: its WAV data chunk lacks 101 bytes"
    assert truncated in messages
    # The cache remembers them: the same warnings on the next run, without decoding again.
    with warnings.catch_warnings(record=True) as caught_again:
        warnings.simplefilter("always")
        make_dm(folder, tmp_path, test_pattern=FSDD_TEST_PATTERN)
    assert [str(w.message) for w in caught_again] == messages


def test_bad_file_raises_if_asked(tmp_path):
    folder = write_wav_folder(tmp_path / "wavs")
    (folder / "5_george_5.wav").write_bytes(b"RIFF....WAVEfmt broken")
    with pytest.raises(ValueError, match=r"bad audio file '5_george_5.wav' in .*: not a readable audio file"):
        make_dm(folder, tmp_path, on_bad_file="raise")
    assert not list((tmp_path / "cache").rglob("*.bin*"))  # nothing half written is left
    with pytest.warns(UserWarning, match="'5_george_5.wav'"):
        make_dm(folder, tmp_path, on_bad_file="warn")
    with pytest.raises(ValueError, match="bad audio file '5_george_5.wav'"):  # also from the cache
        make_dm(folder, tmp_path, on_bad_file="raise")


def test_no_readable_audio(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    write_bad_files(folder)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable audio in .*: all 5 files were"):
        make_dm(folder, tmp_path)
    folder = write_wav_folder(tmp_path / "wavs")
    (folder / "test_only.wav").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"the test split .* none of its 1 file\(s\)"):
        make_dm(folder, tmp_path, test_pattern="test_only")


def test_empty_folder_missing_path_and_plain_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        make_dm(tmp_path / "empty", tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        make_dm(tmp_path / "nope.tar", tmp_path)
    single = write_wav_folder(tmp_path / "wavs", n=1) / fsdd_name(0)
    with pytest.raises(ValueError, match="is a file but not a tar archive"):
        make_dm(single, tmp_path)


def test_split_shorter_than_one_window(tmp_path):
    folder = write_wav_folder(tmp_path / "wavs", n=4, seconds=0.01)  # 80 samples, 160 bytes a file
    with pytest.raises(ValueError, match="the val split .* has 160 bytes, fewer than one window of seq_len 256"):
        make_dm(folder, tmp_path, split=(0.5, 0.25, 0.25), seq_len=256)


def test_bad_arguments():
    expected = "seq_len 33 is not a positive multiple of 2, the bytes of one pcm16 sample: use e.g. seq_len 32"
    with pytest.raises(ValueError, match=re.escape(expected)):
        AudioDataModule("x", seq_len=33)
    AudioDataModule("x", seq_len=33, encoding="mulaw")
    with pytest.raises(ValueError, match="encoding must be one of"):
        AudioDataModule("x", encoding="mp3")
    with pytest.raises(ValueError, match="split must be three fractions"):
        AudioDataModule("x", split=(0.9, 0.2, 0.05))
    with pytest.raises(ValueError, match=r"test_pattern '\(' is not a valid regular expression"):
        AudioDataModule("x", test_pattern="(")
    with pytest.raises(ValueError, match="on_bad_file must be"):
        AudioDataModule("x", on_bad_file="ignore")


# -- cache ------------------------------------------------------------------------------------


def test_cache_is_reused_and_follows_files_and_options(tmp_path, monkeypatch):
    folder = write_wav_folder(tmp_path / "wavs")
    first = make_dm(folder, tmp_path, test_pattern=FSDD_TEST_PATTERN)
    assert isinstance(first.splits["train"], np.memmap)
    (meta,) = (tmp_path / "cache").rglob("meta.json")
    assert json.loads(meta.read_text())["files"] == first.files

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(datamodules.audio.datamodule, "read_waveform", no_decoding)
    again = make_dm(folder, tmp_path, test_pattern=FSDD_TEST_PATTERN)
    assert all(bytes(again.splits[s]) == bytes(first.splits[s]) for s in SPLITS)
    for changed in ({"sample_rate": 16000}, {"encoding": "mulaw"}, {"seed": 1}, {"split": (0.8, 0.2, 0.0)}):
        with pytest.raises(AssertionError, match="decoded again"):
            make_dm(folder, tmp_path, test_pattern=FSDD_TEST_PATTERN, **changed)
    monkeypatch.undo()

    soundfile.write(folder / fsdd_name(5), sine(3000, 0.5, 8000), 8000, subtype="PCM_16")  # twice as long
    changed = make_dm(folder, tmp_path, test_pattern=FSDD_TEST_PATTERN)
    assert sum(len(changed.splits[s]) for s in SPLITS) == sum(len(first.splits[s]) for s in SPLITS) + 4000


# -- real data --------------------------------------------------------------------------------


def test_fsdd_archive_loads_with_the_official_split_and_trains(data_dir, tmp_path):
    # About 1 s on 2 CPU cores: 0.7 s to decode the 3,000 files, then 3 steps and 2 validation batches.
    archive = data_dir / "audio" / "fsdd.tar"
    dm = make_dm(archive, tmp_path, seq_len=64, test_pattern=FSDD_TEST_PATTERN, split=(0.9, 0.1, 0.0))
    assert len(dm.files["test"]) == 300 and all(re.search(r"_[0-4]\.wav$", name) for name in dm.files["test"])
    assert len(dm.files["train"]) + len(dm.files["val"]) == 2700 and len(dm.files["val"]) == 270
    assert all(name.startswith("fsdd/recordings/") for s in SPLITS for name in dm.files[s])
    # 8 kHz 16-bit mono in, 8 kHz pcm16 out: the first test file's bytes are its WAV's samples, unchanged.
    name = next(iter(dm.files["test"]))
    with tarfile.open(archive) as tar, wave.open(tar.extractfile(name)) as f:
        assert bytes(dm.splits["test"][: dm.files["test"][name]]) == f.readframes(f.getnframes())
    seconds = sum(len(dm.splits[s]) for s in SPLITS) / 2 / 8000
    assert abs(seconds - 1312.3) < 0.1  # the dataset's documented length: 8 kHz, nothing resampled
    lm = MegaByteLM(tiny_megabyte_config(max_seq_len=64), lr=1e-3, warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=2)  # fmt: skip
    trainer.fit(lm, dm)
    assert trainer.global_step == 3
    assert 0 < trainer.callback_metrics["val/bpb"].item() < 9


def test_patch_mismatch_asks_for_whole_samples():
    assert AudioDataModule("x", seq_len=64, encoding="pcm16").patch_mismatch(32) is None
    assert AudioDataModule("x", seq_len=64, encoding="mulaw").patch_mismatch(7) is None  # 1 byte a sample
    message = AudioDataModule("x", seq_len=64, encoding="pcm16").patch_mismatch(33)
    assert "patch_size 33 is not a whole number of pcm16 samples (2 bytes each)" in message
    assert message.endswith("--model.arch.init_args.patch_size 32 or 34")
    assert AudioDataModule("x", seq_len=64, encoding="pcm16").patch_mismatch(1).endswith("patch_size 2")
