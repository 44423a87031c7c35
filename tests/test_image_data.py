"""ImageDataModule: image <-> bytes in both scans, every source format, splits, cache, bad files."""

import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.image.downloads
from datamodules.image import ImageDataModule, bytes_to_image, image_to_bytes, pixels_to_bytes
from megabyte import MegaByteLM
from tests.conftest import tiny_megabyte_config
from tests.image_files import random_pixels, write_cifar_batch, write_idx_images, write_image_folder, write_npz_batch


def make_dm(path, tmp_path, **kwargs) -> ImageDataModule:
    kwargs = {"image_size": 8, "channels": 3, "batch_size": 4, "num_workers": 0, **kwargs}
    dm = ImageDataModule(str(path), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def source_rows(dm: ImageDataModule) -> np.ndarray:
    """Every image of ``path``, in source order: uint8 (N, seq_len)."""
    return np.asarray(dm.splits["train"].images)


def rows(dataset) -> np.ndarray:
    return np.stack([dataset[i].numpy() for i in range(len(dataset))])


def numbered_idx(path, n: int, size: int = 8):
    """An idx file of ``n`` grey images, image i filled with the value i: a split shows which images it holds."""
    return write_idx_images(path, np.repeat(np.arange(n, dtype=np.uint8), size * size).reshape(n, size, size))


# -- image <-> bytes --------------------------------------------------------------------------------


def test_raster_scan_by_hand():
    image = torch.arange(12, dtype=torch.uint8).reshape(3, 2, 2)  # red 0..3, green 4..7, blue 8..11
    assert image_to_bytes(image, "raster").tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


def test_patch_scan_by_hand():
    grey = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4)
    assert image_to_bytes(grey, "patch", 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    # (C, H, W) = (3, 2, 4): value 100 c + 10 y + x; two 2x2 blocks of 12 bytes, P = 2 * 2 * 3
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(2), torch.arange(4), indexing="ij")
    rgb = (100 * c + 10 * y + x).to(torch.uint8)
    assert image_to_bytes(rgb, "patch", 2).tolist() == [
        0, 100, 200, 1, 101, 201, 10, 110, 210, 11, 111, 211,  # left block: (0,0) (0,1) (1,0) (1,1)
        2, 102, 202, 3, 103, 203, 12, 112, 212, 13, 113, 213,  # right block
    ]  # fmt: skip


@pytest.mark.parametrize("scan,scan_patch", [("raster", 2), ("patch", 1), ("patch", 2), ("patch", 4)])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (3, 4, 12), (1, 12, 4)])
def test_round_trips_are_exact(scan, scan_patch, shape):
    generator = torch.Generator().manual_seed(0)
    C, H, W = shape
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    data = image_to_bytes(image, scan, scan_patch)
    assert data.dtype == np.uint8 and data.shape == (H * W * C,)
    assert torch.equal(bytes_to_image(data, H, W, C, scan, scan_patch), image)
    raw = np.random.default_rng(1).integers(0, 256, H * W * C, dtype=np.uint8)
    assert np.array_equal(image_to_bytes(bytes_to_image(raw, H, W, C, scan, scan_patch), scan, scan_patch), raw)
    if scan_patch == 1:  # 1x1 blocks are the raster order
        assert np.array_equal(data, image_to_bytes(image, "raster"))


def test_bytes_to_image_takes_any_bytes():
    rng = np.random.default_rng(0)
    for trial in range(200):
        data = rng.integers(0, 256, rng.integers(0, 400), dtype=np.uint8)
        container = [bytes(data), bytearray(data), data, torch.from_numpy(data).long()][trial % 4]
        scan = ("raster", "patch")[trial % 2]
        image = bytes_to_image(container, 8, 8, 3, scan, 2)
        assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
        kept = data[:192]
        padded = np.concatenate([kept, np.zeros(192 - len(kept), dtype=np.uint8)])  # short: black at the end
        assert np.array_equal(image_to_bytes(image, scan, 2), padded)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"channels": 2}, r"channels must be 1 \(grey\) or 3 \(RGB\), got 2"),
        ({"image_size": 30, "scan": "patch", "scan_patch": 4},
         "image_size 30x30 is not divisible by scan_patch 4: use image_size 32x32 or scan_patch 3"),
        ({"image_size": 0}, "image_size must be a positive int or"),
        ({"image_size": [8, 8, 8]}, "image_size must be a positive int or"),
        ({"scan": "zigzag"}, "scan must be 'raster' or 'patch'"),
        ({"scan_patch": 0}, "scan_patch must be a positive integer"),
        ({"resize": "pad"}, "resize must be 'resize' or 'crop'"),
        ({"on_bad_file": "ignore"}, "on_bad_file must be 'warn' or 'raise'"),
        ({"split": (0.9, 0.0, 0.1)}, r"split must be three fractions .* e.g. \[0.9, 0.05, 0.05\]"),
        ({"split": (0.9, 0.2, 0.1)}, "split must be three fractions"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"path": "mnist", "test_path": "test.tar"}, "mnist has its own test set: leave test_path unset"),
    ],
)  # fmt: skip
def test_bad_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageDataModule(**kwargs)


def test_seq_len_from_args():
    assert ImageDataModule.seq_len_from_args({}) == 28 * 28  # the defaults: 28 x 28, 1 channel
    assert ImageDataModule.seq_len_from_args({"image_size": 8, "channels": 3}) == 192
    assert ImageDataModule.seq_len_from_args({"image_size": [4, 6], "path": "x"}) == 24
    assert ImageDataModule.seq_len_from_args({"image_size": (64, 64), "channels": 3}) == 12288
    assert ImageDataModule(image_size=(4, 6), channels=3).seq_len == 72


def test_patch_mismatch_names_the_block_a_megabyte_patch_should_be():
    assert ImageDataModule(channels=3, scan="patch", scan_patch=2).patch_mismatch(12) is None
    assert ImageDataModule(channels=1, scan="patch", scan_patch=2).patch_mismatch(4) is None
    assert ImageDataModule(channels=3, scan="patch", scan_patch=2).patch_mismatch(24) is None  # two whole blocks
    assert ImageDataModule(channels=3, scan="raster").patch_mismatch(5) is None  # no block to match
    message = ImageDataModule(channels=3, scan="patch", scan_patch=2).patch_mismatch(4)
    assert "patch_size 4 is not a whole number of the patch scan's 2 x 2 x 3 = 12-byte pixel blocks" in message
    assert "--model.arch.init_args.patch_size 12 (one block, as in the paper)" in message


# -- sources ------------------------------------------------------------------------------------------


def test_folder_of_mixed_formats_and_modes(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rgb, grey = random_pixels(1, 8, 8, 3)[0], random_pixels(1, 8, 8, 1, seed=1)[0, ..., 0]
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb).save(folder / "bitmap.bmp")
    Image.fromarray(rgb).save(folder / "lossless.webp", lossless=True)
    y, x = np.mgrid[0:8, 0:8]
    smooth = np.stack([16 * y + 8, 16 * x + 8, 120 + 0 * x], axis=-1).astype(np.uint8)  # JPEG keeps it closely
    Image.fromarray(smooth).save(folder / "photo.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).quantize(16).save(folder / "palette.gif")
    Image.fromarray(grey).save(folder / "grey.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "deep.png")  # 16-bit grey ("I;16")
    Image.new("RGBA", (8, 8), (200, 100, 50, 128)).save(folder / "rgba.png")
    Image.new("LA", (8, 8), (200, 0)).save(folder / "transparent.png")
    Image.fromarray(random_pixels(1, 5, 7, 3)[0]).save(folder / "odd.png")  # 7 wide, 5 high: resized
    names = sorted(f.name for f in folder.iterdir())
    assert Image.open(folder / "deep.png").mode == "I;16"

    dm = make_dm(folder, tmp_path, channels=3, split=(0.5, 0.25, 0.25))
    images = dict(zip(names, (dm.decode(row) for row in source_rows(dm))))
    assert len(images) == 11 and all(image.shape == (3, 8, 8) for image in images.values())
    as_chw = torch.from_numpy(rgb).permute(2, 0, 1)
    for name in ("rgb.png", "bitmap.bmp", "lossless.webp"):
        assert torch.equal(images[name], as_chw), name
    assert (images["photo.jpg"].int() - torch.from_numpy(smooth).permute(2, 0, 1).int()).abs().float().mean() < 4
    assert torch.equal(images["grey.png"], torch.from_numpy(grey).expand(3, 8, 8))
    assert torch.equal(images["deep.png"], torch.from_numpy(grey).expand(3, 8, 8))  # scaled, not clipped
    # alpha composited onto black: round(200 * 128 / 255) = 100, ...
    assert images["rgba.png"][:, 0, 0].tolist() == [100, 50, 25]
    assert images["transparent.png"].eq(0).all()

    dm = make_dm(folder, tmp_path, channels=1, split=(0.5, 0.25, 0.25))
    images = dict(zip(names, (dm.decode(row) for row in source_rows(dm))))
    assert all(image.shape == (1, 8, 8) for image in images.values())
    assert torch.equal(images["grey.png"][0], torch.from_numpy(grey))
    assert torch.equal(images["deep.png"][0], torch.from_numpy(grey))
    assert torch.equal(images["rgb.png"][0], torch.from_numpy(np.array(Image.fromarray(rgb).convert("L"))))


def test_crop_keeps_the_aspect_ratio(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, 4:12] = 255  # a white center square between black sides
    Image.fromarray(wide).save(folder / "wide.png")
    Image.fromarray(wide).save(folder / "wide2.png")
    Image.fromarray(wide).save(folder / "wide3.png")
    cropped = make_dm(folder, tmp_path, resize="crop", split=(0.4, 0.3, 0.3))
    assert (source_rows(cropped) == 255).all()  # the center 8 x 8 is all white
    stretched = make_dm(folder, tmp_path, resize="resize", split=(0.4, 0.3, 0.3))
    image = stretched.decode(source_rows(stretched)[0])  # columns 4..11 of 16 become 2..5 of 8
    assert (image[:, :, 3:5] == 255).all() and (image[:, :, [0, 7]] == 0).all()


def test_image_folder_and_flat_layouts_hold_the_same_images(tmp_path):
    nested = write_image_folder(tmp_path / "nested", n=12, classes=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for file in nested.rglob("*.png"):
        shutil.copy(file, flat / f"{file.parent.name}-{file.name}")
    (flat / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are ignored
    a, b = source_rows(make_dm(nested, tmp_path)), source_rows(make_dm(flat, tmp_path))
    assert a.shape == b.shape == (12, 192)
    assert np.array_equal(a, b)  # both sorted by path: class_0/0000.png, class_0/0003.png, ...
    expected = random_pixels(12, 8, 8, 3)
    assert np.array_equal(a[0], expected[0].reshape(-1)) and np.array_equal(a[4], expected[1].reshape(-1))


def test_train_and_test_subfolders_are_the_splits(tmp_path):
    write_image_folder(tmp_path / "data" / "train", n=10)
    write_image_folder(tmp_path / "data" / "test", n=3, seed=1)
    dm = make_dm(tmp_path / "data", tmp_path, split=(0.8, 0.2, 0.0))
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [8, 2, 3]
    assert np.array_equal(rows(dm.splits["test"]), source_rows(make_dm(tmp_path / "data" / "test", tmp_path)))
    with pytest.raises(ValueError, match="has its own test set"):
        make_dm(tmp_path / "data", tmp_path, test_path=str(tmp_path / "data" / "test"))


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_tar_archive_of_images(tmp_path, suffix, mode):
    folder = write_image_folder(tmp_path / "images", n=12)
    archive = tmp_path / f"images{suffix}"
    with tarfile.open(archive, mode) as tar:
        for file in sorted(folder.rglob("*.png")):
            tar.add(file, arcname=f"images/train/{file.relative_to(folder)}")
        tar.addfile(tarfile.TarInfo("images/train/._0000.png"), io.BytesIO(b""))  # macOS metadata: ignored
    assert np.array_equal(source_rows(make_dm(archive, tmp_path)), source_rows(make_dm(folder, tmp_path)))


@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"])
def test_mnist_idx_file(tmp_path, name):
    images = random_pixels(20, 8, 8, 1)[..., 0]
    file = write_idx_images(tmp_path / name, images)
    dm = make_dm(file, tmp_path, channels=1, split=(0.9, 0.1, 0.0))
    assert np.array_equal(source_rows(dm), images.reshape(20, 64))
    rgb = make_dm(file, tmp_path, channels=3, split=(0.9, 0.1, 0.0))
    assert np.array_equal(source_rows(rgb), np.repeat(images.reshape(20, 64), 3, axis=1))  # grey -> R = G = B
    assert source_rows(make_dm(file, tmp_path, image_size=4, channels=1, split=(0.9, 0.1, 0.0))).shape == (20, 16)


def test_mnist_folder_with_train_and_t10k_files(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    train, test = random_pixels(12, 8, 8, 1)[..., 0], random_pixels(5, 8, 8, 1, seed=1)[..., 0]
    write_idx_images(folder / "train-images-idx3-ubyte.gz", train)
    write_idx_images(folder / "train-images-idx3-ubyte", train)  # torchvision keeps both: read once
    write_idx_images(folder / "t10k-images-idx3-ubyte.gz", test)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(8 + 5)))
    dm = make_dm(tmp_path / "MNIST", tmp_path, channels=1, split=(0.75, 0.25, 0.0))
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [9, 3, 5]
    assert np.array_equal(source_rows(dm), train.reshape(12, 64))
    assert np.array_equal(rows(dm.splits["test"]), test.reshape(5, 64))


def test_cifar10_python_folder(tmp_path):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [random_pixels(4, 32, 32, 3, seed=i) for i in range(3)]
    write_cifar_batch(folder / "data_batch_1", batches[0])
    write_cifar_batch(folder / "data_batch_2", batches[1])
    write_cifar_batch(folder / "test_batch", batches[2])
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane"]}))
    for path in (tmp_path / "cifar", folder):  # the folder, or the one holding it
        dm = make_dm(path, tmp_path, image_size=32, split=(0.75, 0.25, 0.0))
        assert np.array_equal(source_rows(dm), np.concatenate(batches[:2]).reshape(8, -1))  # raster: H, W, C
        assert np.array_equal(rows(dm.splits["test"]), batches[2].reshape(4, -1))
    assert source_rows(make_dm(folder, tmp_path, image_size=16, split=(0.75, 0.25, 0.0))).shape == (8, 16 * 16 * 3)


def test_imagenet_npz_batches(tmp_path):
    folder = tmp_path / "imagenet8"
    folder.mkdir()
    train = [random_pixels(6, 8, 8, 3, seed=i) for i in range(2)]
    val = random_pixels(4, 8, 8, 3, seed=2)
    write_npz_batch(folder / "train_data_batch_1.npz", train[0])
    write_npz_batch(folder / "train_data_batch_2.npz", train[1])
    write_npz_batch(folder / "val_data.npz", val)
    dm = make_dm(folder, tmp_path, scan="patch", scan_patch=2, split=(0.75, 0.25, 0.0))
    assert np.array_equal(source_rows(dm), pixels_to_bytes(np.concatenate(train), "patch", 2))
    assert np.array_equal(rows(dm.splits["test"]), pixels_to_bytes(val, "patch", 2))  # val_data.npz is the test set
    first = np.load(folder / "train_data_batch_1.npz")["data"][0]
    assert np.array_equal(dm.decode(source_rows(dm)[0])[0].numpy().reshape(-1), first[:64])  # planar: red first
    single = make_dm(folder / "val_data.npz", tmp_path, split=(0.5, 0.25, 0.25))
    assert np.array_equal(source_rows(single), pixels_to_bytes(val, "raster", 1))


def test_test_path_is_the_test_split(tmp_path):
    write_image_folder(tmp_path / "train", n=10)
    test = write_image_folder(tmp_path / "test", n=3, seed=1)
    with tarfile.open(tmp_path / "test.tgz", "w:gz") as tar:
        tar.add(test, arcname="test")
    dm = make_dm(tmp_path / "train", tmp_path, test_path=str(tmp_path / "test.tgz"), split=(0.7, 0.2, 0.1))
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [8, 2, 3]  # the test fraction went to train
    assert np.array_equal(rows(dm.splits["test"]), source_rows(make_dm(test, tmp_path)))


# -- bad input ----------------------------------------------------------------------------------------


def test_bad_files_are_skipped_with_one_warning_or_raise(tmp_path):
    folder = write_image_folder(tmp_path / "images", n=6)
    (folder / "broken.png").write_bytes(b"not an image at all")
    jpeg = io.BytesIO()
    Image.fromarray(random_pixels(1, 64, 64, 3)[0]).save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "notes.txt").write_text("labels: cats and dogs\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = make_dm(folder, tmp_path, split=(0.5, 0.25, 0.25))
    (warning,) = [w for w in caught if "unreadable" in str(w.message)]
    assert all(name in str(warning.message) for name in ("broken.png", "truncated.jpg", "notes.txt"))
    assert "skipped 3 unreadable file(s)" in str(warning.message)
    assert len(source_rows(dm)) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_dm(folder, tmp_path, split=(0.5, 0.25, 0.25))  # cached: no second warning
    with pytest.raises(ValueError, match="cannot read image file .*broken.png"):
        make_dm(folder, tmp_path, on_bad_file="raise", image_size=4)
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_corrupt_array_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(np.array([2051, 10, 8, 8], dtype=">u4").tobytes() + bytes(100))
    reason = "holds 100 pixel bytes, its header says 10 x 8 x 8"
    with pytest.raises(ValueError, match=f"all 1 files are unreadable, e.g. .*train-images-idx3-ubyte .*{reason}"):
        make_dm(tmp_path / "train-images-idx3-ubyte", tmp_path)


def test_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        make_dm(tmp_path / "empty", tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="no readable images in .*junk.*: all 1 files are unreadable, e.g. .*a.txt"):
        make_dm(tmp_path / "junk", tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        make_dm(tmp_path / "nope.png", tmp_path)
    (tmp_path / "table.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="table.csv.* is not an image source"):
        make_dm(tmp_path / "table.csv", tmp_path)


# -- splits, loaders, cache ------------------------------------------------------------------------


def test_split_sizes_and_determinism(tmp_path):
    file = numbered_idx(tmp_path / "images-idx3-ubyte", 20)

    def split_ids(**kwargs):
        dm = make_dm(file, tmp_path, channels=1, split=(0.8, 0.1, 0.1), **kwargs)
        return [rows(dm.splits[s])[:, 0].tolist() for s in ("train", "val", "test")]

    train, val, test = split_ids(seed=0)
    assert [len(train), len(val), len(test)] == [16, 2, 2]
    assert sorted(train + val + test) == list(range(20))
    assert split_ids(seed=0) == [train, val, test]
    assert split_ids(seed=1) != [train, val, test]
    assert split_ids(shuffle_split=False) == [list(range(16)), [16, 17], [18, 19]]


def test_mnist_style_split_and_small_fractions(tmp_path):
    file = numbered_idx(tmp_path / "images-idx3-ubyte", 10)
    dm = make_dm(file, tmp_path, channels=1, split=(0.9, 0.1, 0.0), shuffle_split=False)
    assert rows(dm.splits["val"])[:, 0].tolist() == [9]  # the last 10%: MNIST t10k's first 9,000 / last 1,000
    with pytest.raises(ValueError, match=r"there is no test split: give test_path, or a positive test fraction"):
        dm.test_dataloader()
    dm = make_dm(file, tmp_path, channels=1, split=(0.96, 0.02, 0.02))
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [8, 1, 1]  # a positive fraction: >= 1 image


def test_loaders(tmp_path):
    file = numbered_idx(tmp_path / "images-idx3-ubyte", 20)
    dm = make_dm(file, tmp_path, channels=1, batch_size=3, split=(0.8, 0.1, 0.1))
    batches = list(dm.train_dataloader())
    assert len(batches) == 5  # 16 images, the last short batch dropped
    for x, mask in batches:
        assert x.dtype == torch.uint8 and x.shape == (3, 64) and mask.dtype == torch.bool and mask.all()
    seen = torch.cat([x for x, _ in batches])[:, 0].tolist()
    assert len(set(seen)) == 15 and set(seen) <= set(rows(dm.splits["train"])[:, 0].tolist())
    again = make_dm(file, tmp_path, channels=1, batch_size=3, split=(0.8, 0.1, 0.1))
    assert torch.equal(torch.cat([x for x, _ in again.train_dataloader()]), torch.cat([x for x, _ in batches]))
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        x = torch.cat([x for x, _ in loader])
        assert np.array_equal(x.numpy(), rows(dm.splits[split]))  # every image once, in order
    assert len(dm.predict_dataloader().dataset) == 2

    few = make_dm(file, tmp_path, channels=1, batch_size=32, split=(0.8, 0.1, 0.1))
    (x, mask), *rest = list(few.train_dataloader())
    assert x.shape == (32, 64) and not rest  # fewer images than a batch: one batch, drawn with replacement


def test_cache_is_reused_and_keyed_by_source_and_options(tmp_path):
    folder = write_image_folder(tmp_path / "images", n=12)
    dm = make_dm(folder, tmp_path)
    assert isinstance(dm.splits["train"].images, np.memmap)
    (cached,) = (tmp_path / "cache").rglob("images.bin")
    stamp = cached.stat().st_mtime_ns
    make_dm(folder, tmp_path, batch_size=2, seed=3, split=(0.5, 0.25, 0.25))  # no new bytes
    assert list((tmp_path / "cache").rglob("images.bin")) == [cached] and cached.stat().st_mtime_ns == stamp
    patch = make_dm(folder, tmp_path, scan="patch")
    assert len(list((tmp_path / "cache").rglob("images.bin"))) == 2
    by_path = random_pixels(12, 8, 8, 3)[[0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]]  # class_0/0000, class_0/0002, ...
    assert np.array_equal(source_rows(patch), pixels_to_bytes(by_path, "patch", 2))
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "class_0" / "0000.png")  # a source file changes
    changed = make_dm(folder, tmp_path)
    assert changed.decode(source_rows(changed)[0])[:, 0, 0].tolist() == [1, 2, 3]
    rows_ = changed.splits["val"]
    assert torch.equal(pickle.loads(pickle.dumps(rows_))[0], rows_[0])  # worker processes reopen the map


def test_decode_save_and_examples(tmp_path):
    folder = write_image_folder(tmp_path / "images", n=12, channels=1)
    dm = make_dm(folder, tmp_path, channels=1, scan="patch", scan_patch=4)
    row = dm.splits["val"][0]
    image = dm.decode(row)
    assert image.shape == (1, 8, 8) and torch.equal(image, bytes_to_image(row, 8, 8, 1, "patch", 4))
    path = dm.save(row, tmp_path / "sample.txt")
    assert path == tmp_path / "sample.png"
    saved = Image.open(path)
    assert saved.mode == "L" and np.array_equal(np.asarray(saved), image[0].numpy())
    assert dm.decode(b"\xff" * 5).sum() == 5 * 255 and dm.media == "image"
    assert [e.shape for e in dm.examples(3)] == [(64,)]  # one val image
    rgb = make_dm(write_image_folder(tmp_path / "rgb", n=12), tmp_path)
    assert Image.open(rgb.save(rgb.splits["test"][0], tmp_path / "rgb")).mode == "RGB"


# -- named sources (torchvision) -------------------------------------------------------------------


def test_named_source_download_failure_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(datamodules.image.downloads.torchvision.datasets, "MNIST", offline)
    dm = ImageDataModule("mnist", cache_dir=str(tmp_path / "cache"), num_workers=0)
    message = r"mnist is not in .*MNIST/raw and could not be downloaded .*no network.*data.path"
    with pytest.raises(RuntimeError, match=message):
        dm.prepare_data()


def md5s(folder) -> list[tuple[str, str]]:
    return [(f.name, hashlib.md5(f.read_bytes()).hexdigest()) for f in sorted(folder.iterdir())]


def test_a_partial_download_is_never_taken_for_a_complete_one(tmp_path, monkeypatch):
    raw = tmp_path / "cache" / "torchvision" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx_images(raw / "train-images-idx3-ubyte.gz", random_pixels(20, 8, 8, 1)[..., 0])
    write_idx_images(raw / "t10k-images-idx3-ubyte.gz", random_pixels(4, 8, 8, 1)[..., 0])
    complete = {f.name: f.read_bytes() for f in raw.iterdir()}
    monkeypatch.setitem(datamodules.image.downloads.TORCHVISION_FILES, "mnist", md5s(raw))
    (raw / "train-images-idx3-ubyte.gz").write_bytes(complete["train-images-idx3-ubyte.gz"][:100])  # cut short
    downloads = []

    def download(root, train, download):  # what torchvision does: fetch the files that are missing
        downloads.append(sorted(f.name for f in raw.iterdir()))
        for name, data in complete.items():
            if not (raw / name).exists():
                (raw / name).write_bytes(data)

    monkeypatch.setattr(datamodules.image.downloads.torchvision.datasets, "MNIST", download)
    dm = make_dm("mnist", tmp_path, channels=1)
    assert downloads == [["t10k-images-idx3-ubyte.gz"]]  # the truncated file was removed before downloading
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [19, 1, 4]

    # a download that still does not match the checksums is an error, not data
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"not mnist")
    complete["t10k-images-idx3-ubyte.gz"] = b"still not mnist"
    with pytest.raises(RuntimeError, match="do not match torchvision's MD5 checksums"):
        datamodules.image.downloads.download_named("mnist", tmp_path / "cache")


def test_named_sources_use_files_already_in_the_cache(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(datamodules.image.downloads.torchvision.datasets, "MNIST", no_download)
    monkeypatch.setattr(datamodules.image.downloads.torchvision.datasets, "CIFAR10", no_download)
    raw = tmp_path / "cache" / "torchvision" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx_images(raw / "train-images-idx3-ubyte.gz", random_pixels(20, 8, 8, 1)[..., 0])
    write_idx_images(raw / "t10k-images-idx3-ubyte.gz", random_pixels(4, 8, 8, 1)[..., 0])
    # these stand-ins pass the checksum test only with their own MD5s
    monkeypatch.setitem(datamodules.image.downloads.TORCHVISION_FILES, "mnist", md5s(raw))
    dm = make_dm("mnist", tmp_path, channels=1)
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [19, 1, 4]

    batches = tmp_path / "cache" / "torchvision" / "cifar-10-batches-py"
    batches.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(batches / name, random_pixels(2, 32, 32, 3))
    monkeypatch.setitem(datamodules.image.downloads.TORCHVISION_FILES, "cifar10", md5s(batches))
    dm = make_dm("cifar10", tmp_path, image_size=32, split=(0.8, 0.2, 0.0))
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [8, 2, 2]


# -- the real datasets --------------------------------------------------------------------------------


def fit_tiny_megabyte(dm: ImageDataModule, patch_size: int) -> L.Trainer:
    torch.manual_seed(0)
    config = tiny_megabyte_config(
        max_seq_len=dm.seq_len, patch_size=patch_size, d_global=48, n_global_layers=1, n_local_layers=1
    )
    model = MegaByteLM(config, warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, dm)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    return trainer


def test_real_mnist_and_cifar10_load_and_train(data_dir, tmp_path):
    images = data_dir / "images"
    mnist = make_dm(images / "mnist-t10k", tmp_path, image_size=28, channels=1, scan="patch", scan_patch=2,
                    split=(0.9, 0.1, 0.0), shuffle_split=False)  # fmt: skip
    assert source_rows(mnist).shape == (10_000, 28 * 28 * 1)
    assert len(mnist.splits["train"]) == 9_000 and mnist.splits["val"].indices.tolist() == list(range(9_000, 10_000))
    raw = gzip.decompress((images / "mnist-t10k" / "t10k-images-idx3-ubyte.gz").read_bytes())
    first = np.frombuffer(raw, dtype=np.uint8, offset=16, count=784).reshape(28, 28)
    assert np.array_equal(mnist.decode(source_rows(mnist)[0])[0].numpy(), first)
    fit_tiny_megabyte(mnist, patch_size=4)  # 2 x 2 x 1 blocks

    cifar = make_dm(images / "cifar10-test.tar.gz", tmp_path, image_size=32, channels=3, scan="patch", scan_patch=2,
                    split=(0.8, 0.1, 0.1))  # fmt: skip
    assert source_rows(cifar).shape == (10_000, 32 * 32 * 3)
    assert [len(cifar.splits[s]) for s in ("train", "val", "test")] == [8_000, 1_000, 1_000]
    fit_tiny_megabyte(cifar, patch_size=12)  # 2 x 2 x 3 blocks
