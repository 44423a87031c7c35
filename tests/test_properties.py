"""Property-based tests (hypothesis): decoders accept any bytes, windows stay inside their split,
padding never changes the logits of real positions."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from datamodules.audio import decode_bytes
from datamodules.image import bytes_to_image
from datamodules.base import SPLITS, split_bounds
from datamodules.text import bytes_to_text
from datamodules.windows import EvalWindows, RandomWindows, ResumableSampler
from megabyte import ByteTransformer, MegaByte
from tests.conftest import tiny_megabyte_config, tiny_transformer_config

FAST = settings(max_examples=40, deadline=None)


@FAST
@given(st.binary(max_size=300))
def test_text_decoder_accepts_any_bytes(data):
    assert isinstance(bytes_to_text(data), str)
    assert bytes_to_text(data.decode("utf-8", errors="replace").encode()) == bytes_to_text(data)


@FAST
@given(
    st.binary(max_size=200), st.integers(1, 8), st.integers(1, 8), st.sampled_from([1, 3]),
    st.sampled_from(["raster", "patch"]),
)  # fmt: skip
def test_image_decoder_accepts_any_bytes(data, half_height, half_width, channels, scan):
    height, width = 2 * half_height, 2 * half_width
    image = bytes_to_image(data, height, width, channels, scan, scan_patch=2)
    assert image.shape == (channels, height, width) and image.dtype == torch.uint8
    assert int(image.sum()) == sum(data[: height * width * channels])  # every byte once, the rest black


@FAST
@given(st.binary(max_size=200), st.sampled_from(["pcm16", "mulaw"]))
def test_audio_decoder_accepts_any_bytes(data, encoding):
    waveform = decode_bytes(data, encoding)
    assert waveform.dtype == torch.float32 and waveform.dim() == 1
    assert len(waveform) == (len(data) // 2 if encoding == "pcm16" else len(data))
    assert bool(torch.isfinite(waveform).all()) and bool((waveform.abs() <= 1.0).all())


@FAST
@given(
    st.integers(3, 2000), st.integers(1, 64), st.integers(1, 8),
    st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20)), st.integers(0, 3),
)  # fmt: skip
def test_windows_never_cross_a_split_boundary(n_bytes, seq_len, step, weights, seed):
    split = tuple(w / sum(weights) for w in weights)
    split = (split[0], split[1], 1.0 - split[0] - split[1])
    data = np.arange(n_bytes, dtype=np.int64)  # each byte is its offset
    bounds = split_bounds(n_bytes, split)
    for name, start, end in zip(SPLITS, bounds[:-1], bounds[1:]):
        part = data[start:end]
        if len(part) == 0:
            continue
        covered = [int(i) for w in EvalWindows(part, seq_len) for i in w]
        assert covered == list(range(start, end))  # exactly once, in order, nothing outside
        if len(part) < seq_len:
            continue
        windows = RandomWindows(part, seq_len, step)
        sampler = ResumableSampler(len(windows), 16, seed, replacement=True)
        for i in sampler:
            window = windows[i]
            assert len(window) == seq_len and start <= int(window[0]) and int(window[-1]) < end


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 64), st.integers(0, 2**31 - 1), st.booleans())
def test_padding_never_changes_the_logits_of_real_positions(t, seed, megabyte):
    torch.manual_seed(0)
    model = (MegaByte(tiny_megabyte_config()) if megabyte else ByteTransformer(tiny_transformer_config())).eval()
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(seed))
    padded = x.clone()
    padded[:, t:] = 0  # what pad_collate puts after a short window
    with torch.no_grad():
        short, full, other = model(x[:, :t]), model(padded), model(x)
    torch.testing.assert_close(short, full[:, :t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short, other[:, :t], rtol=1e-5, atol=1e-5)
