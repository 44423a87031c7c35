"""The Triton kernel of the local model's attention (megabyte/kernels/short_attention.py) computes causal
attention of every short sequence alone, forward and backward. Checked on the CPU under Triton's
interpreter in float32 (the interpreter's bf16 is not faithful; bf16 on the GPU is checked against
float64 by benchmarks/short_attention_speed.py, errors in benchmarks/RESULTS.md)."""


import pytest
import torch

from megabyte.kernels.short_attention import short_causal_attention
from tests.conftest import run_interpreted
from tests.short_attention_interpreted import CASES


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """tests/short_attention_interpreted.py's results, under Triton's interpreter."""
    return run_interpreted("tests/short_attention_interpreted.py")


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_attention_in_float64(interpreted, case):
    """Output and gradient of qkv against softmax attention spelled out in float64, for ragged last
    tiles, tiles not filled by whole sequences, padded head sizes and one-position sequences."""
    result = interpreted["cases"][case]
    assert result["finite"]
    assert result["out"] < 1e-6
    assert result["grad"] < 1e-6


def test_kernel_traces_under_torch_compile(interpreted):
    assert interpreted["compiled"] == {"out": True, "grad": True}
    assert all(interpreted["opcheck"].values()), interpreted["opcheck"]


@pytest.mark.parametrize("model", ["megabyte", "megabyte-cross-patch"])
def test_megabyte_through_the_kernel_equals_written_out_attention(interpreted, model):
    """Same logits, gradients and FLOP count (FlopCounterMode: the kernel's ops have formulas), also for
    cross-patch attention's windows of 4 + 8 positions."""
    assert interpreted[model]["logits"] < 1e-5
    assert interpreted[model]["grads"] < 1e-5
    written_out, kernel = interpreted[model]["flops"]
    assert kernel == written_out > 0


@pytest.mark.parametrize(
    "shape, n_heads, tile, message",
    [
        ((4, 8, 90), 4, None, "d a multiple of n_heads 4"),
        ((4, 8), 2, None, r"expected qkv \(N, L, 3 \* d\)"),
        ((2, 100, 96), 2, None, "sequence length 100 is outside 1..64"),
        ((4, 8, 96), 2, 48, "tile must be a power of two >= 16, got 48"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(shape, n_heads, tile, message):
    with pytest.raises(ValueError, match=message):
        short_causal_attention(torch.zeros(shape), n_heads, tile=tile)
