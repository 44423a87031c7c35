"""Causal attention over many short sequences: the local model's patches (length P <= SHORT_SEQUENCE).

Fused attention kernels tile queries and keys by 64 or 128, so for sequences of 8 bytes they would
spend most of their work on padding. Three backends compute the same attention, and a caller names
one (``ShortAttention``); "auto" picks the fastest that the device and the dropout allow:

- "kernel": ``megabyte.kernels.short_attention``, a Triton kernel that attends whole sequences inside
  its tiles (CUDA, or CPU tensors under Triton's interpreter; no attention dropout);
- "packed": G sequences side by side as one of length G * L <= PACKED_LENGTH under a block-diagonal
  causal mask, for SDPA, which then fills its tiles (a GPU with attention dropout);
- "written-out": two small batched matmuls (the CPU, where packing would only multiply the work).
"""

from typing import Literal, get_args

import torch
import torch.nn.functional as F

try:  # Triton comes with torch's CUDA builds on Linux; without it "auto" never picks the kernel
    from megabyte.kernels.short_attention import short_causal_attention as short_attention_kernel
except ImportError:
    short_attention_kernel = None

SHORT_SEQUENCE = 32  # sequences up to this long take a short-attention backend
PACKED_LENGTH = 128  # the longest sequence "packed" builds

ShortAttention = Literal["auto", "kernel", "packed", "written-out"]
BACKENDS: tuple[str, ...] = get_args(ShortAttention)


def written_out_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout: float = 0.0
) -> torch.Tensor:
    """Softmax attention as two batched matmuls. q: (N, nh, L, hs), k, v: (N, nh, S, hs), mask: bool
    (L, S), True where a query sees a key -> (N, nh, L, hs)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, nh, L, S)
    weights = F.dropout(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1), dropout)
    return weights.to(v.dtype) @ v  # (N, nh, L, hs)


def sequences_per_pack(N: int, L: int) -> int:
    """How many of N sequences of length L to attend as one: the largest divisor G of N with
    G * L <= PACKED_LENGTH (1 leaves them apart)."""
    return max(G for G in range(1, max(1, PACKED_LENGTH // L) + 1) if N % G == 0)


def block_causal_mask(G: int, L: int, device: torch.device) -> torch.Tensor:
    """bool (G*L, G*L): position i sees j when both lie in the same block of L and j <= i."""
    i = torch.arange(G * L, device=device)
    return (i[:, None] // L == i // L) & (i[:, None] >= i)


def resolve_backend(backend: ShortAttention, device: torch.device, dropout: float) -> ShortAttention:
    """The backend "auto" stands for on ``device`` with attention ``dropout``; a named one as it is."""
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "written-out"
    return "kernel" if short_attention_kernel is not None and dropout == 0.0 else "packed"


def short_causal_attention(
    qkv: torch.Tensor, n_heads: int, dropout: float = 0.0, backend: ShortAttention = "auto"
) -> torch.Tensor:
    """qkv: (N, L, 3d), the fused projection of N sequences of length L <= SHORT_SEQUENCE (queries, then
    keys, then values) -> (N, L, d), each position attending causally within its own sequence."""
    N, L, d3 = qkv.shape
    d = d3 // 3
    backend = resolve_backend(backend, qkv.device, dropout)
    if backend == "kernel":
        if short_attention_kernel is None or dropout != 0.0:
            raise ValueError("short_attention 'kernel' needs Triton and no attention dropout: use 'auto'")
        return short_attention_kernel(qkv, n_heads)  # (N, L, d)
    G = sequences_per_pack(N, L) if backend == "packed" else 1
    qkv = qkv.reshape(N // G, G * L, d3)  # (n, l, 3d): G sequences side by side
    n, l = qkv.shape[:2]
    # (n, l, d) -> (n, nh, l, hs)
    q, k, v = (t.view(n, l, n_heads, d // n_heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
    mask = block_causal_mask(G, L, qkv.device)  # (l, l)
    if backend == "packed":  # one fused kernel
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (n, nh, l, hs)
    else:
        y = written_out_attention(q, k, v, mask, dropout)  # (n, nh, l, hs)
    return y.transpose(1, 2).reshape(N, L, d)  # (N, L, d)
