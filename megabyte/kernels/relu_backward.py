"""The ReLU's backward pass inside the matrix product that computes its input gradient, in Triton.

In a feed-forward layer ``W2 relu(W1 x + b1) + b2`` the backward pass computes the hidden activation's
gradient ``dY @ W2`` and then, in a pass of its own, zeroes it where the ReLU's output ``h`` is 0, and
sums it over the rows for ``b1``'s gradient: two more reads and a write of the largest activation of the
layer (config M's local model: 65,536 x 1,536 per layer). Here one kernel does all three: it multiplies
tiles of ``dY`` and ``W2``, reads the tile of ``h`` and writes the masked gradient, with each tile's
column sums, so the hidden activation's gradient is written once and never read back for ``b1``. Its
tiles are copied by the tensor memory accelerator (TMA, through tensor descriptors: 11 % faster than
pointer loads on an H100); tensors whose rows TMA cannot copy take PyTorch's operations instead.

``megabyte.kernels.inductor_passes.FuseReluBackwardIntoMatmul`` puts it into compiled training graphs on CUDA; the model code
does not call it. The kernel also runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before this module is imported), which is how the tests check it without a GPU.
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

BLOCK_M = 128  # rows per program; also the rows behind each row of column sums
BLOCK_N = 128  # with 3 stages and 4 warps: the fastest setting measured on an H100
BLOCK_K = 64
GROUP_M = 8  # row tiles that take their column tiles in turn, so that B's tiles are reused from L2
NUM_STAGES = 3
NUM_WARPS = 4


@triton.jit
def _relu_backward_matmul(
    A, B, OUT, GRAD, COLUMN_SUMS, M, N, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, B_TRANSPOSED: tl.constexpr, PRECISION: tl.constexpr,
):
    # A, B, OUT and GRAD are tensor descriptors: their tiles are copied by the tensor memory accelerator
    # (TMA), which reads zeros past the edges and writes nothing there, so ragged shapes need no masks.
    # K (the weights' dimension) is a compile-time constant: a loop over a run-time bound fails under
    # Triton 3.6's interpreter with numpy 2, and a model has few values of it.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = pid // per_group * GROUP_M
    group_rows = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    om, on = tile_m * BLOCK_M, tile_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = A.load([om, k0])  # (BLOCK_M, BLOCK_K)
        b = tl.trans(B.load([on, k0])) if B_TRANSPOSED else B.load([k0, on])  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    grad = tl.where(OUT.load([om, on]) > 0, acc, 0.0).to(GRAD.dtype)
    GRAD.store([om, on], grad)
    # b1's gradient from the values just stored (rounded as stored); rows past M hold zeros
    rn = on + tl.arange(0, BLOCK_N)
    tl.store(COLUMN_SUMS + tile_m * N + rn, tl.sum(grad.to(tl.float32), 0), mask=rn < N)


def _tma_loadable(t: torch.Tensor) -> bool:
    """Whether TMA can copy tiles of the 2-D ``t``: rows of unit stride, 16-byte aligned start and row stride."""
    return t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0


def runs_kernel(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``relu_backward_matmul(a, b, out)`` runs the kernel; otherwise (rows that TMA cannot copy,
    such as a width whose bytes are not a multiple of 16, or an empty inner dimension) it computes the
    same with PyTorch's operations."""
    grad_loadable = b.shape[1] * a.element_size() % 16 == 0  # the gradient is written contiguous
    copyable = _tma_loadable(a) and (_tma_loadable(b) or _tma_loadable(b.t())) and _tma_loadable(out)
    return copyable and grad_loadable and a.shape[1] > 0


def _check(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"expected a (M, K) and b (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    if out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"expected the ReLU's output of shape {(a.shape[0], b.shape[1])}, got {tuple(out.shape)}")
    if a.dtype != b.dtype or a.device != b.device or out.device != a.device:
        raise ValueError(f"a, b and out must share a device and a and b a dtype, got {a.dtype} on {a.device}, "
                         f"{b.dtype} on {b.device}, out on {out.device}")  # fmt: skip


@torch.library.custom_op("megabyte::relu_backward_matmul", mutates_args=())
def _relu_backward_matmul_op(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, block_n: int, num_stages: int, num_warps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    (M, K), N = a.shape, b.shape[1]
    tiles_m = triton.cdiv(M, BLOCK_M)
    if not runs_kernel(a, b, out):
        grad = torch.where(out > 0, a @ b, 0).to(a.dtype)
        rows = torch.nn.functional.pad(grad.float(), (0, 0, 0, tiles_m * BLOCK_M - M))  # whole tiles of rows
        return grad, rows.view(tiles_m, BLOCK_M, N).sum(1)
    grad = a.new_empty(M, N)
    column_sums = torch.empty(tiles_m, N, dtype=torch.float32, device=a.device)
    if grad.numel():  # an empty product launches nothing
        transposed = not _tma_loadable(b)
        descriptors = (
            TensorDescriptor.from_tensor(a, [BLOCK_M, BLOCK_K]),
            TensorDescriptor.from_tensor(b.t(), [block_n, BLOCK_K]) if transposed
            else TensorDescriptor.from_tensor(b, [BLOCK_K, block_n]),
            TensorDescriptor.from_tensor(out, [BLOCK_M, block_n]),
            TensorDescriptor.from_tensor(grad, [BLOCK_M, block_n]),
        )  # fmt: skip
        _relu_backward_matmul[(tiles_m * triton.cdiv(N, block_n),)](
            *descriptors, column_sums, M, N, K=K, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
            GROUP_M=GROUP_M, B_TRANSPOSED=transposed,
            PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # tf32 is ignored for bf16 / fp16
            num_stages=num_stages, num_warps=num_warps,
        )  # fmt: skip
    return grad, column_sums


@_relu_backward_matmul_op.register_fake
def _(a, b, out, block_n, num_stages, num_warps):
    (M, _), N = a.shape, b.shape[1]
    return a.new_empty(M, N), a.new_empty(triton.cdiv(M, BLOCK_M), N, dtype=torch.float32)


def relu_backward_matmul(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, block_n: int | None = None,
    num_stages: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of a ReLU's input, ``(a @ b) * (out > 0)``, and its column sums.

    a: (M, K) the gradient reaching the ReLU's output is ``a @ b`` (the next layer's output gradient and
        its weight); b: (K, N), same dtype and device (float32 / bf16 / fp16; CUDA, or the CPU under
        Triton's interpreter); out: (M, N) the ReLU's output (any dtype).
    Returns grad (M, N) in a's dtype, and column sums (ceil(M / BLOCK_M), N) float32 whose sum over
    rows is ``grad.sum(0)`` (the ReLU's input bias gradient). Not differentiable (it is a backward pass).
    The kernel runs where ``runs_kernel(a, b, out)``; elsewhere PyTorch's operations give the same.
    ``block_n``, ``num_stages`` and ``num_warps`` tune the kernel (defaults: the module's constants).
    """
    _check(a, b, out)
    return _relu_backward_matmul_op(a, b, out, block_n or BLOCK_N, num_stages or NUM_STAGES, num_warps or NUM_WARPS)
