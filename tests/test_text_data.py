import gzip

import numpy as np
import pytest
import torch

from datamodules import TextDataModule
from datamodules.base import split_bounds
from datamodules.text import python_stdlib_files
from datamodules.windows import EvalWindows, RandomWindows, pad_collate


def make_dm(path, tmp_path, **kwargs) -> TextDataModule:
    kwargs = {"seq_len": 64, "batch_size": 4, "num_workers": 0, **kwargs}
    dm = TextDataModule(str(path), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_split_boundaries_are_contiguous_90_5_5(text_file, tmp_path):
    data = text_file.read_bytes()
    dm = make_dm(text_file, tmp_path)
    n = len(data)
    a, b = int(n * 0.9), int(n * 0.95)
    assert bytes(dm.splits["train"]) == data[:a]
    assert bytes(dm.splits["val"]) == data[a:b]
    assert bytes(dm.splits["test"]) == data[b:]


def test_split_bounds_are_exact():
    # the figures in the datasets' README: docs-prose, tiny Shakespeare
    assert split_bounds(84_283_424, (0.9, 0.05, 0.05)) == [0, 75_855_081, 80_069_252, 84_283_424]
    assert split_bounds(1_115_394, (0.9, 0.05, 0.05)) == [0, 1_003_854, 1_059_624, 1_115_394]
    assert split_bounds(100_000_000, (0.9, 0.05, 0.05)) == [0, 90_000_000, 95_000_000, 100_000_000]


def test_splits_are_memory_mapped_from_the_cache(text_file, tmp_path):
    dm = make_dm(text_file, tmp_path)
    assert isinstance(dm.splits["train"], np.memmap)
    (cached,) = (tmp_path / "cache").rglob("bytes.bin")
    assert cached.read_bytes() == text_file.read_bytes()


@pytest.mark.parametrize("stage", ["val", "test"])
def test_eval_windows_cover_every_byte_exactly_once(text_file, tmp_path, stage):
    dm = make_dm(text_file, tmp_path, batch_size=3)
    loader = dm.val_dataloader() if stage == "val" else dm.test_dataloader()
    pieces = []
    for x, mask in loader:
        assert x.dtype == torch.uint8 and mask.dtype == torch.bool
        for row, keep in zip(x, mask):
            assert keep.sum() == 64 or not keep[keep.sum() :].any()  # padding only at the end
            pieces.append(row[keep].numpy())
    assert np.concatenate(pieces).tobytes() == bytes(dm.splits[stage])


def test_eval_windows_short_last_window():
    data = np.arange(10, dtype=np.uint8)
    windows = EvalWindows(data, 4)
    assert len(windows) == 3
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    x, mask = pad_collate(list(windows))
    assert x.tolist()[2] == [8, 9, 0, 0] and mask.tolist()[2] == [True, True, False, False]


def test_train_windows_are_seeded_and_full_length(text_file, tmp_path):
    def first_batches(seed):
        dm = make_dm(text_file, tmp_path, seed=seed)
        batches = [x for x, _ in dm.train_dataloader()][:5]
        return torch.stack(batches), dm

    a, dm = first_batches(0)
    b, _ = first_batches(0)
    c, _ = first_batches(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (5, 4, 64)
    train = bytes(dm.splits["train"])
    for window in a.reshape(-1, 64):
        assert bytes(window.numpy()) in train  # every window lies inside the train split


def test_random_windows_stay_inside_the_data():
    data = np.arange(100, dtype=np.uint8)
    windows = RandomWindows(data, 30)
    assert len(windows) == 71
    assert windows[70].tolist() == list(range(70, 100))
    with pytest.raises(ValueError, match="no window"):
        RandomWindows(data[:10], 30)


def test_gzip_file_and_folder(tmp_path):
    parts = {"b/2.bin": bytes(range(256)) * 20, "a.txt": b"hello world\n" * 300, "b/1.gz": None}
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_bytes(parts["a.txt"])
    (folder / "b" / "2.bin").write_bytes(parts["b/2.bin"])
    (folder / "b" / "1.gz").write_bytes(gzip.compress(b"\x00\xff" * 1000))  # a .gz inside a folder is decompressed
    dm = make_dm(folder, tmp_path, seq_len=16)
    expected = parts["a.txt"] + b"\x00\xff" * 1000 + parts["b/2.bin"]  # sorted by path: a.txt, b/1.gz, b/2.bin
    got = b"".join(bytes(dm.splits[s]) for s in ("train", "val", "test"))
    assert got == expected

    gz = tmp_path / "single.txt.gz"
    gz.write_bytes(gzip.compress(expected))
    dm = make_dm(gz, tmp_path, seq_len=16)
    assert b"".join(bytes(dm.splits[s]) for s in ("train", "val", "test")) == expected


def test_cache_follows_changes_of_the_file(text_file, tmp_path):
    make_dm(text_file, tmp_path)
    text_file.write_bytes(b"changed content " * 1000)
    dm = make_dm(text_file, tmp_path)
    assert bytes(dm.splits["train"]).startswith(b"changed content")


def test_python_stdlib_corpus_is_sorted_source_code():
    files = python_stdlib_files()
    assert files == sorted(files)
    assert any(f.name == "os.py" for f in files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


def test_missing_path(tmp_path):
    dm = TextDataModule(str(tmp_path / "nope.txt"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        dm.prepare_data()


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    dm = TextDataModule(str(empty), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="holds no bytes"):
        dm.prepare_data()
    assert not (tmp_path / "cache").exists()  # no empty cache folder left behind, nor the folders above it


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    dm = TextDataModule(str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="contains no files"):
        dm.prepare_data()


def test_split_shorter_than_one_window(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 1000)  # val and test get 50 bytes each
    with pytest.raises(ValueError, match="the val split .* has 50 bytes, fewer than one window of seq_len 64"):
        make_dm(small, tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be three positive fractions"):
        TextDataModule(split=(0.9, 0.2, 0.05))
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        TextDataModule(seq_len=0)


def test_real_corpora_split_as_documented(data_dir, tmp_path):
    dm = make_dm(data_dir / "text" / "tinyshakespeare.txt", tmp_path)
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [1_003_854, 1_059_624 - 1_003_854, 1_115_394 - 1_059_624]
    assert bytes(dm.splits["train"][:10]) == b"First Citi"
    dm = make_dm(data_dir / "text" / "cpython-docs.txt.gz", tmp_path)
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [9_865_320, 10_413_393 - 9_865_320, 10_961_467 - 10_413_393]
