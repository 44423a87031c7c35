"""Causal self-attention of many short sequences (MEGABYTE's local model: length P) in Triton.

The local model attends inside each patch only: config M trains on 8,192 patches of 8 bytes per
step. Fused attention kernels tile queries and keys by 64 or 128, so for sequences of 8 they work
mostly on padding, and SDPA needs its inputs split into heads and copied. Here one program takes one
head of ``TILE // L`` whole sequences (8 of 8 bytes: 64 positions), reads its queries, keys and values
straight from the rows of the fused ``qkv`` projection, computes every score of the tile with one
matrix product, keeps those inside a sequence and causal, and writes the output already in the
layout the output projection reads. The whole softmax fits in the tile, so no running maximum is
needed; the backward pass recomputes the scores from the saved log-sum-exp, as flash attention does,
and writes the gradient of ``qkv`` in one tensor.

The "kernel" backend of ``megabyte.attention`` (on CUDA, without attention dropout); deleting this file
makes "auto" choose SDPA instead, with the same results. On an H100 a layer of config M's local model takes 0.23 ms
forward and backward: its 604 MB of inputs and outputs at 2.6 TB/s.
The kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before this
module is imported), which is how the tests check them without a GPU.
"""

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

TILE = 64  # positions per program: TILE // L whole sequences of length L <= TILE (64 beat 32 and 128 on an H100)
NUM_WARPS = 4


@triton.jit
def _tile_scores(
    QKV, tile, head, M, stride_row, d, scale, L: tl.constexpr, TILE: tl.constexpr, HS: tl.constexpr,
    HS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Scores of one head over one tile: (TILE, TILE) float32, -inf outside a sequence or ahead of the
    query; also the tile's q, k, v (TILE, HS_PAD), its rows and row / load masks."""
    TOKENS: tl.constexpr = TILE // L * L  # whole sequences only
    r = tl.arange(0, TILE)
    rows = tile.to(tl.int64) * TOKENS + r  # (TILE,) rows of qkv; 64-bit, as offsets can pass 2**31
    row_ok = (r < TOKENS) & (rows < M)
    c = tl.arange(0, HS_PAD)
    offsets = rows[:, None] * stride_row + head * HS + c[None, :]  # (TILE, HS_PAD) into the q part of a row
    load_ok = row_ok[:, None] & (c[None, :] < HS)
    q = tl.load(QKV + offsets, mask=load_ok, other=0.0)
    k = tl.load(QKV + d + offsets, mask=load_ok, other=0.0)
    v = tl.load(QKV + 2 * d + offsets, mask=load_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (TILE, TILE)
    # A position sees the positions of its own sequence up to itself; the diagonal keeps every row,
    # padding rows included, with one finite score.
    visible = (r[:, None] // L == r[None, :] // L) & (r[None, :] <= r[:, None])
    s = tl.where(visible, s, float("-inf"))
    return q, k, v, s, rows, row_ok, load_ok, c


@triton.jit
def _short_attention_forward(
    QKV, O, LSE, M, stride_row, n_heads, d, scale, L: tl.constexpr, TILE: tl.constexpr, HS: tl.constexpr,
    HS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    tile, head = tl.program_id(0), tl.program_id(1)
    q, k, v, s, rows, row_ok, load_ok, c = _tile_scores(
        QKV, tile, head, M, stride_row, d, scale, L, TILE, HS, HS_PAD, PRECISION
    )
    m = tl.max(s, 1)
    p = tl.exp(s - m[:, None])
    denominator = tl.sum(p, 1)
    o = tl.dot((p / denominator[:, None]).to(v.dtype), v, input_precision=PRECISION)  # (TILE, HS_PAD)
    tl.store(O + rows[:, None] * d + head * HS + c[None, :], o.to(O.dtype.element_ty), mask=load_ok)
    tl.store(LSE + rows * n_heads + head, m + tl.log(denominator), mask=row_ok)


@triton.jit
def _short_attention_backward(
    QKV, O, DO, LSE, DQKV, M, stride_row, n_heads, d, scale, L: tl.constexpr, TILE: tl.constexpr,
    HS: tl.constexpr, HS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    tile, head = tl.program_id(0), tl.program_id(1)
    q, k, v, s, rows, row_ok, load_ok, c = _tile_scores(
        QKV, tile, head, M, stride_row, d, scale, L, TILE, HS, HS_PAD, PRECISION
    )
    out_offsets = rows[:, None] * d + head * HS + c[None, :]  # (TILE, HS_PAD) into O and DO
    o = tl.load(O + out_offsets, mask=load_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + out_offsets, mask=load_ok, other=0.0)
    lse = tl.load(LSE + rows * n_heads + head, mask=row_ok, other=0.0)
    p = tl.exp(s - lse[:, None])  # (TILE, TILE) the forward's attention weights, 0 where hidden
    dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (TILE, TILE)
    delta = tl.sum(o * do.to(tl.float32), 1)  # (TILE,) = sum_j p_ij dp_ij
    ds = (p * (dp - delta[:, None]) * scale).to(q.dtype)  # gradient of the scaled scores
    dq = tl.dot(ds, k, input_precision=PRECISION)
    dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION)
    dqkv_offsets = rows[:, None] * 3 * d + head * HS + c[None, :]
    tl.store(DQKV + dqkv_offsets, dq.to(DQKV.dtype.element_ty), mask=load_ok)
    tl.store(DQKV + d + dqkv_offsets, dk.to(DQKV.dtype.element_ty), mask=load_ok)
    tl.store(DQKV + 2 * d + dqkv_offsets, dv.to(DQKV.dtype.element_ty), mask=load_ok)


def _launch_arguments(qkv: torch.Tensor, n_heads: int, tile: int) -> tuple[tuple, dict]:
    """The grid and the arguments both kernels share, for qkv (N, L, 3d) contiguous."""
    N, L, three_d = qkv.shape
    d = three_d // 3
    M, hs = N * L, d // n_heads
    grid = (triton.cdiv(M, tile // L * L), n_heads)
    precision = "ieee" if qkv.dtype == torch.float32 else "tf32"  # tf32 is ignored for bf16 / fp16 inputs
    constants = {"L": L, "TILE": tile, "HS": hs, "HS_PAD": max(16, triton.next_power_of_2(hs)), "PRECISION": precision}
    return grid, dict(M=M, stride_row=three_d, n_heads=n_heads, d=d, scale=hs**-0.5, **constants)


def _check(qkv: torch.Tensor, n_heads: int, tile: int) -> None:
    if qkv.dim() != 3 or qkv.shape[2] % (3 * n_heads):
        raise ValueError(f"expected qkv (N, L, 3 * d) with d a multiple of n_heads {n_heads}, got {tuple(qkv.shape)}")
    if not 1 <= qkv.shape[1] <= tile:
        raise ValueError(f"sequence length {qkv.shape[1]} is outside 1..{tile} (the tile)")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")


@torch.library.custom_op("megabyte::short_causal_attention_forward", mutates_args=())
def _forward(qkv: torch.Tensor, n_heads: int, tile: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, L, three_d = qkv.shape
    o = qkv.new_empty(N, L, three_d // 3)
    lse = torch.empty(N, L, n_heads, dtype=torch.float32, device=qkv.device)
    if o.numel():  # an empty batch launches nothing
        grid, arguments = _launch_arguments(qkv, n_heads, tile)
        _short_attention_forward[grid](qkv, o, lse, num_warps=num_warps, **arguments)
    return o, lse


@_forward.register_fake
def _(qkv, n_heads, tile, num_warps):
    N, L, three_d = qkv.shape
    return qkv.new_empty(N, L, three_d // 3), qkv.new_empty(N, L, n_heads, dtype=torch.float32)


@torch.library.custom_op("megabyte::short_causal_attention_backward", mutates_args=())
def _backward(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, n_heads: int, tile: int, num_warps: int
) -> torch.Tensor:
    dqkv = torch.empty_like(qkv)
    if dqkv.numel():
        grid, arguments = _launch_arguments(qkv, n_heads, tile)
        _short_attention_backward[grid](qkv, o, do.contiguous(), lse, dqkv, num_warps=num_warps, **arguments)
    return dqkv


@_backward.register_fake
def _(do, qkv, o, lse, n_heads, tile, num_warps):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output) -> None:
    qkv, ctx.n_heads, ctx.tile, ctx.num_warps = inputs
    ctx.save_for_backward(qkv, *output)


def _gradient(ctx, do: torch.Tensor, dlse: torch.Tensor | None):
    qkv, o, lse = ctx.saved_tensors
    return _backward(do, qkv, o, lse, ctx.n_heads, ctx.tile, ctx.num_warps), None, None, None


_forward.register_autograd(_gradient, setup_context=_setup_context)


@register_flop_formula(torch.ops.megabyte.short_causal_attention_forward)
def _forward_flops(qkv_shape, *args, out_shape=None) -> int:
    """FlopCounterMode's count: the scores q k^T and the products with v, 2 FLOPs per multiply-add,
    as for the written-out attention (the kernel's work on the tile's masked-out scores is not counted)."""
    N, L, three_d = qkv_shape
    return 4 * N * L * L * (three_d // 3)


@register_flop_formula(torch.ops.megabyte.short_causal_attention_backward)
def _backward_flops(do_shape, qkv_shape, *args, out_shape=None) -> int:
    """Twice the forward: the gradients of both products (the scores' recomputation is not counted)."""
    return 2 * _forward_flops(qkv_shape)


def short_causal_attention(
    qkv: torch.Tensor, n_heads: int, tile: int | None = None, num_warps: int | None = None
) -> torch.Tensor:
    """Causal self-attention of each of N sequences alone, softmax(q k^T / sqrt(hs)) v per head.

    qkv: (N, L, 3 * d) queries, keys and values side by side (the output of a fused projection),
        float32 / bf16 / fp16, on CUDA (or the CPU under Triton's interpreter); 1 <= L <= tile.
    Returns (N, L, d), heads side by side, differentiable with respect to qkv.
    ``tile`` (a power of two >= 16; default ``TILE``) and ``num_warps`` (default ``NUM_WARPS``) tune the kernels.
    """
    tile, num_warps = tile or TILE, num_warps or NUM_WARPS
    _check(qkv, n_heads, tile)
    return _forward(qkv.contiguous(), n_heads, tile, num_warps)[0]
