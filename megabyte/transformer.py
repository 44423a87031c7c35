"""The layers both architectures are built from, in reading order: the key/value cache, causal
self-attention, the feed-forward layer, the pre-norm block and the Transformer stack.

Shapes: N sequences of L positions, width d, nh heads of hs = d / nh.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from megabyte.attention import SHORT_SEQUENCE, ShortAttention, short_causal_attention


class KVCache:
    """The keys and values a Transformer stack has seen, for decoding a few positions at a time.

    One cache serves every block of a stack. The first forward through it (the prefill) allocates
    each block's buffer (2, N, nh, max_len, hs), keys then values, with the dtype and device of its
    keys and writes positions 0..L-1, which attend causally among themselves. ``length`` (a 0-dim
    device tensor) counts the filled positions; later forwards write at ``length`` and attend over a
    window of the buffers, positions 0..S-1, through an additive bias that hides the unfilled ones:
    the whole buffers (S = max_len) unless ``narrow`` chose a shorter window. Where to write and the
    bias are computed once per forward, by its first block, for all the blocks; ``length`` is never
    read on the host, so a decoding step can be captured once per window as a CUDA graph (or
    compiled) and replayed.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.kv: list[torch.Tensor | None] = [None] * n_layers  # (2, N, nh, max_len, hs) per block
        self.length: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (L,) the positions the current forward writes
        self.bias: torch.Tensor | None = None  # (L, S) 0 where a new position sees a key, else -inf
        # The windows ``narrow`` chooses from: multiples of max_len / 8 and, below, max_len / 16 and / 32
        # (at most 10, each a CUDA graph per kind of step). At least 2: torch.compile specialises a size of 1.
        block = -(-max_len // 8)
        sizes = {-(-max_len // 32), -(-max_len // 16), *(k * block for k in range(1, 9))}
        self.windows = tuple(sorted({min(max_len, max(2, s)) for s in sizes}))
        self.window: torch.Tensor | None = None  # (S,) the buffer positions attended over; None: all max_len
        self._window_positions: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget every position (the buffers and the window stay)."""
        if self.length is not None:
            self.length.zero_()

    def narrow(self, length: int | None) -> int | None:
        """Let the forwards that follow attend over the shortest of ``windows`` holding ``length``
        positions, buffer positions 0..S-1, instead of the whole buffers: the caller, who knows on the
        host how far the cache is filled, calls it before a forward whenever the positions it reads
        (0..length-1, the new ones included) outgrow the window. A window too short for them hides the
        newest keys: wrong results, unchecked (checking would read ``length`` on the host).
        None: the whole buffers again. -> S (None for the whole buffers).

        Each window is a device tensor of its positions, kept for the cache's life: a CUDA graph
        captured with it stays valid, and it is marked dynamic, so one compilation of a step serves
        every window.
        """
        if length is None:
            self.window = None
            return None
        if not 1 <= length <= self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; cannot attend over {length}")
        if self.kv[0] is None:
            raise ValueError("narrow a KVCache after its first forward (the prefill), which places its buffers")
        size = next(s for s in self.windows if s >= length)
        if size not in self._window_positions:
            self._window_positions[size] = torch.arange(size, device=self.kv[0].device)
            torch._dynamo.maybe_mark_dynamic(self._window_positions[size], 0)
        self.window = self._window_positions[size]
        return size

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """k, v: (N, nh, L, hs), block ``layer``'s keys and values of the next L positions ->
        (keys, values, bias) to attend over: in the first forward the new ones alone and bias None
        (causal), later the window of the block's buffers (N, nh, S, hs) and the bias (L, S)."""
        L = k.shape[2]
        if self.length is None:
            if L > self.max_len:
                raise ValueError(f"KVCache holds {self.max_len} positions; cannot add {L}")
            self.kv[layer] = k.new_zeros(2, *k.shape[:2], self.max_len, k.shape[3])
            self.kv[layer][:, :, :, :L] = torch.stack([k, v])
            return k, v, None
        if self.positions is None:  # the first block of this forward
            self.positions = self.length + torch.arange(L, device=k.device)  # (L,)
            window = torch.arange(self.max_len, device=k.device) if self.window is None else self.window  # (S,)
            visible = window <= self.positions[:, None]  # (L, S)
            self.bias = torch.zeros(visible.shape, dtype=k.dtype, device=k.device).masked_fill(~visible, float("-inf"))
        # One write for keys and values (one kernel when compiled), in place also under torch.compile.
        self.kv[layer][:, :, :, self.positions] = torch.stack([k, v])  # (2, N, nh, L, hs)
        S = self.bias.shape[1]
        return self.kv[layer][0, :, :, :S], self.kv[layer][1, :, :, :S], self.bias

    def advance(self, L: int) -> None:
        """After every block appended L positions: count them."""
        if self.length is None:
            self.length = torch.tensor(L, device=self.kv[0].device)
        else:
            self.length.add_(L)
        self.positions = self.bias = None


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention``.

    ``is_causal=True`` lets the GPU pick flash / memory-efficient kernels. Batches of short sequences
    (the local model's patches, up to SHORT_SEQUENCE) take ``megabyte.attention``'s backend
    ``short_attention`` instead ("auto": the fastest the device allows; every backend computes the
    same attention).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, short_attention: ShortAttention = "auto") -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.short_attention = short_attention
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x: (N, L, d) -> (N, L, d). With a ``cache``, x holds the L positions after the cached ones
        and this is block ``layer`` of the cache's stack."""
        N, L, d = x.shape
        dropout = self.dropout if self.training else 0.0
        if cache is None and L <= SHORT_SEQUENCE:  # the local model's patches
            y = short_causal_attention(self.qkv(x), self.n_heads, dropout, self.short_attention)  # (N, L, d)
            return self.resid_dropout(self.proj(y))
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (N, L, d)
        # (N, L, d) -> (N, nh, L, hs)
        q, k, v = (t.view(N, L, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (N, nh, L, hs)
        else:
            k, v, bias = cache.append(layer, k, v)  # (N, nh, S, hs), bias None (causal) or (L, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=bias is None)
        y = y.transpose(1, 2).reshape(N, L, d)  # (N, L, d)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise MLP with the paper's ReLU."""

    def __init__(self, d_model: int, d_hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_hidden)
        self.proj = nn.Linear(d_hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.relu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, d_model: int, n_heads: int, d_hidden: int, dropout: float, short_attention: ShortAttention = "auto"
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout, short_attention)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, d_hidden, dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A causal decoder stack: ``n_layers`` blocks and a final LayerNorm.

    Used for MEGABYTE's global model, its local model and the byte-level baseline.
    ``autocast_residual``: under autocast, carry the residual stream in autocast's dtype.
    ``short_attention``: the backend of its attention over short sequences (``megabyte.attention``).
    """

    def __init__(
        self, d_model: int, n_layers: int, n_heads: int, d_hidden: int, dropout: float, autocast_residual: bool = True,
        short_attention: ShortAttention = "auto",
    ) -> None:  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_hidden, dropout, short_attention) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.autocast_residual = autocast_residual

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: (N, L, d_model) -> (N, L, d_model), position l attends to positions <= l.

        With a ``cache`` (from ``new_cache``), x continues the cached positions.
        """
        if self.autocast_residual and torch.is_autocast_enabled(x.device.type):
            # Every norm and residual add reads and writes the residual stream: in bf16 rather than the
            # float32 of the embeddings, half the memory traffic (norms still compute in float32).
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def new_cache(self, max_len: int) -> KVCache:
        """An empty key/value cache of every block, for decoding up to ``max_len`` positions."""
        return KVCache(len(self.blocks), max_len)
