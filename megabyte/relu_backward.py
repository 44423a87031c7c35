"""The ReLU's backward pass inside the matrix product that computes its input gradient, in Triton.

In a feed-forward layer ``W2 relu(W1 x + b1) + b2`` the backward pass computes the hidden activation's
gradient ``dY @ W2`` and then, in a pass of its own, zeroes it where the ReLU's output ``h`` is 0, and
sums it over the rows for ``b1``'s gradient: two more reads and a write of the largest activation of the
layer (config M's local model: 65,536 x 1,536 per layer). Here one kernel does all three: it multiplies
tiles of ``dY`` and ``W2``, reads the tile of ``h`` and writes the masked gradient, with each tile's
column sums, so the hidden activation's gradient is written once and never read back for ``b1``.

``compilation.FuseReluBackwardIntoMatmul`` puts it into compiled training graphs on CUDA; the model code
does not call it. The kernel also runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before this module is imported), which is how the tests check it without a GPU.
"""

import torch
import triton
import triton.language as tl

BLOCK_M = 128  # rows per program; also the rows behind each row of column sums
BLOCK_N = 128  # with 3 stages and 4 warps: among the fastest of 24 settings on an H100 (RESULTS.md)
BLOCK_K = 64
GROUP_M = 8  # row tiles that take their column tiles in turn, so that B's tiles are reused from L2
NUM_STAGES = 3
NUM_WARPS = 4


@triton.jit
def _relu_backward_matmul(
    A, B, OUT, GRAD, COLUMN_SUMS, M, N, stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN: tl.constexpr, PRECISION: tl.constexpr,
):
    # K (the weights' dimension) is a compile-time constant: a loop over a run-time bound fails under
    # Triton 3.6's interpreter with numpy 2, and a model has few values of it
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = pid // per_group * GROUP_M
    group_rows = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    rm = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit: offsets can pass 2**31
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None] * stride_am + rk[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:  # M, N and K multiples of the blocks: no masks
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = k0 + rk < K
            a = tl.load(a_ptrs, mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    out = tl.load(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on, mask=ok, other=0.0)
    grad = tl.where(out > 0, acc, 0.0).to(GRAD.dtype.element_ty)
    tl.store(GRAD + rm[:, None] * N + rn[None, :], grad, mask=ok)
    # b1's gradient from the values just stored (rounded as stored); rows past M hold zeros
    tl.store(COLUMN_SUMS + tile_m * N + rn, tl.sum(grad.to(tl.float32), 0), mask=rn < N)


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
    grad = a.new_empty(M, N)
    column_sums = torch.empty(triton.cdiv(M, BLOCK_M), N, dtype=torch.float32, device=a.device)
    if grad.numel():  # an empty product launches nothing
        even = M % BLOCK_M == 0 and N % block_n == 0 and K % BLOCK_K == 0
        grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, block_n),)
        _relu_backward_matmul[grid](
            a, b, out, grad, column_sums, M, N, *a.stride(), *b.stride(), *out.stride(), K=K, BLOCK_M=BLOCK_M,
            BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, EVEN=even,
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
    ``block_n``, ``num_stages`` and ``num_warps`` tune the kernel (defaults: the module's constants).
    """
    _check(a, b, out)
    return _relu_backward_matmul_op(a, b, out, block_n or BLOCK_N, num_stages or NUM_STAGES, num_warps or NUM_WARPS)
