"""The Triton kernel of a ReLU's backward inside the matrix product before it (megabyte/kernels/relu_backward.py),
and the inductor pass that puts it into compiled training graphs (megabyte/kernels/inductor_passes.py). Checked on
the CPU under Triton's interpreter in float32 (the interpreter's bf16 is not faithful; bf16 on the GPU is
checked against inductor's own kernels by the benchmark in benchmarks/RESULTS.md)."""


import pytest
import torch

from megabyte.kernels.relu_backward import relu_backward_matmul
from tests.conftest import run_interpreted, tiny_megabyte_config
from tests.relu_backward_interpreted import CASES


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """tests/relu_backward_interpreted.py's results, under Triton's interpreter."""
    return run_interpreted("tests/relu_backward_interpreted.py")


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_masked_product_in_float64(interpreted, case):
    """(a @ b) * (out > 0) and its column sums against float64, for whole blocks, ragged edges in every
    dimension, a transposed weight, no rows and one row; rows that TMA cannot copy take PyTorch's
    operations, with the same results."""
    M, K, N, block_n, _, kernel = CASES[case]
    result = interpreted["cases"][case]
    assert result["kernel"] == kernel
    assert result["shapes"] == [[M, N], [-(-M // 128), N]]
    assert result["grad"] < 1e-6
    assert result["sum"] < 1e-6


def test_kernel_op_passes_opcheck(interpreted):
    assert all(interpreted["opcheck"].values()), interpreted["opcheck"]


def test_compiled_feed_forward_masks_in_the_product(interpreted):
    """Compiled with the pass, a feed-forward layer's backward graph runs the kernel once and no mask of
    its own (no where / le left), and its gradients equal the eager ones."""
    result = interpreted["feed-forward"]
    assert result["kernels"] == 1 and result["masks left"] == 0 and result["gradient sums left"] == 0
    assert result["grads"] < 1e-6


def test_compiled_megabyte_uses_the_kernel_in_every_feed_forward_layer(interpreted):
    """Every feed-forward layer of a MegaByte (global and local) gets the kernel; gradients of a
    compiled training step equal the eager ones."""
    config = tiny_megabyte_config()
    result = interpreted["megabyte"]
    assert result["kernels"] == config.n_global_layers + config.n_local_layers
    assert result["gradient sums left"] == 0  # every bias gradient from the column sums
    assert result["grads"] < 1e-5


def test_a_float32_accumulated_bias_sum_reads_the_column_sums(interpreted):
    """Under CUDA's autocast the bias gradient is a sum over rows with ``dtype=torch.float32`` (left
    alone, every layer's masked gradient would be read again for it); it becomes the column sums' sum
    too, with the same values."""
    result = interpreted["float32 bias sum"]
    assert result["sums before"] == 1 and result["kernels"] == 1 and result["gradient sums left"] == 0
    assert result["grad"] < 1e-6 and result["sum"] < 1e-6


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((4, 8), (9, 5), (4, 5)), r"expected a \(M, K\) and b \(K, N\)"),
        (((4, 8), (8, 5), (4, 6)), r"output of shape \(4, 5\)"),
        (((4, 8, 1), (8, 5), (4, 5)), r"expected a \(M, K\) and b \(K, N\)"),
    ],
)
def test_bad_shapes_are_refused(shapes, message):
    a, b, out = (torch.randn(*shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        relu_backward_matmul(a, b, out)


def test_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="share a device"):
        relu_backward_matmul(torch.randn(4, 8), torch.randn(8, 5, dtype=torch.float64), torch.randn(4, 5))
