"""MEGABYTE (Yu et al., 2023) and the byte-level Transformer it is compared against.

Reads top to bottom like Section 2 of the paper: attention -> feed-forward -> block ->
transformer stack -> configs -> MegaByte -> ByteTransformer. Symbols follow the paper:
V = 256 byte values, T = sequence length, P = patch_size, K = T / P patches,
D_G = d_global / P (per-byte global width).

Both models share one contract: ``forward(x)`` with ``x: LongTensor (B, T)``, values 0..255,
returns logits ``(B, T, 256)`` where ``logits[:, t]`` predicts ``x[:, t]`` from ``x[:, :t]``.
The targets are the input itself; no external shift is needed. ``generate(prompt, ...)``
continues a prompt byte by byte with key/value caches.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # Triton comes with torch's CUDA builds on Linux; elsewhere short sequences take SDPA
    from megabyte.short_attention import short_causal_attention
except ImportError:
    short_causal_attention = None

VOCAB_SIZE = 256  # one token per byte value


class KVCache:
    """The keys and values a Transformer stack has seen, for decoding a few positions at a time.

    One cache serves every block of a stack. The first forward through it (the prefill) allocates
    each block's buffer (2, N, nh, max_len, hs), keys then values, with the dtype and device of its
    keys and writes positions 0..L-1, which attend causally among themselves. ``length`` (a 0-dim
    device tensor) counts the filled positions; later forwards write at ``length`` and attend over the
    whole buffers through an additive bias that hides the unfilled positions. Where to write and the
    bias are computed once per forward, by its first block, for all the blocks; ``length`` is
    never read on the host, so a decoding step can be captured once as a CUDA graph (or compiled)
    and replayed.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.kv: list[torch.Tensor | None] = [None] * n_layers  # (2, N, nh, max_len, hs) per block
        self.length: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (L,) the positions the current forward writes
        self.bias: torch.Tensor | None = None  # (L, max_len) 0 where a new position sees a key, else -inf

    def reset(self) -> None:
        """Forget every position (the buffers stay)."""
        if self.length is not None:
            self.length.zero_()

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """k, v: (N, nh, L, hs), block ``layer``'s keys and values of the next L positions ->
        (keys, values, bias) to attend over: in the first forward the new ones alone and bias None
        (causal), later the block's whole buffers (N, nh, max_len, hs) and the bias (L, max_len)."""
        L = k.shape[2]
        if self.length is None:
            if L > self.max_len:
                raise ValueError(f"KVCache holds {self.max_len} positions; cannot add {L}")
            self.kv[layer] = k.new_zeros(2, *k.shape[:2], self.max_len, k.shape[3])
            self.kv[layer][:, :, :, :L] = torch.stack([k, v])
            return k, v, None
        if self.positions is None:  # the first block of this forward
            self.positions = self.length + torch.arange(L, device=k.device)  # (L,)
            visible = torch.arange(self.max_len, device=k.device) <= self.positions[:, None]  # (L, max_len)
            self.bias = torch.zeros(visible.shape, dtype=k.dtype, device=k.device).masked_fill(~visible, float("-inf"))
        # One write for keys and values (one kernel when compiled), in place also under torch.compile.
        self.kv[layer][:, :, :, self.positions] = torch.stack([k, v])  # (2, N, nh, L, hs)
        return self.kv[layer][0], self.kv[layer][1], self.bias

    def advance(self, L: int) -> None:
        """After every block appended L positions: count them."""
        if self.length is None:
            self.length = torch.tensor(L, device=self.kv[0].device)
        else:
            self.length.add_(L)
        self.positions = self.bias = None


# Up to this length (the local model's P), fused attention kernels, which tile queries and keys by 64
# or 128, would spend most of their work on padding. On a GPU they go to ``short_causal_attention``
# (a Triton kernel that attends whole sequences inside its tiles); with attention dropout, G of them
# are put side by side as one of length G * L <= PACKED_LENGTH under a block-diagonal causal mask for
# SDPA, which fills the tiles; on the CPU attention is two small batched matmuls (written out).
SHORT_SEQUENCE = 32
PACKED_LENGTH = 128


def written_out_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout: float = 0.0
) -> torch.Tensor:
    """Softmax attention as two batched matmuls, for the short sequences on the CPU.
    q: (N, nh, L, hs), k, v: (N, nh, S, hs), mask: bool (L, S), True where a query sees a key
    -> (N, nh, L, hs)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, nh, L, S)
    weights = F.dropout(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1), dropout)
    return weights.to(v.dtype) @ v  # (N, nh, L, hs)


def sequences_per_pack(N: int, L: int) -> int:
    """How many of N sequences of length L to attend as one: the largest divisor G of N with
    G * L <= PACKED_LENGTH (1 leaves them apart)."""
    return max(G for G in range(1, max(1, PACKED_LENGTH // L) + 1) if N % G == 0)


def packs_short_sequences(device: torch.device) -> bool:
    """Packing pays where fused attention kernels run; on the CPU it would only multiply the work."""
    return device.type == "cuda"


def uses_short_attention_kernel(x: torch.Tensor, dropout: float) -> bool:
    """Whether the Triton kernel attends the short sequences in x: on CUDA, without attention dropout."""
    return short_causal_attention is not None and x.is_cuda and dropout == 0.0


def block_causal_mask(G: int, L: int, device: torch.device) -> torch.Tensor:
    """bool (G*L, G*L): position i sees j when both lie in the same block of L and j <= i."""
    i = torch.arange(G * L, device=device)
    return (i[:, None] // L == i // L) & (i[:, None] >= i)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention``.

    ``is_causal=True`` lets the GPU pick flash / memory-efficient kernels. Batches of short sequences
    (the local model's patches) take ``short_causal_attention`` on a GPU instead (see SHORT_SEQUENCE).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x: (N, L, d) -> (N, L, d). With a ``cache``, x holds the L positions after the cached ones
        and this is block ``layer`` of the cache's stack."""
        N, L, d = x.shape
        dropout = self.dropout if self.training else 0.0
        mask = None
        if cache is None and L <= SHORT_SEQUENCE:  # the local model's patches
            if uses_short_attention_kernel(x, dropout):
                y = short_causal_attention(self.qkv(x), self.n_heads)  # (N, L, d)
                return self.resid_dropout(self.proj(y))
            G = sequences_per_pack(N, L) if packs_short_sequences(x.device) else 1
            x = x.reshape(N // G, G * L, d)  # (N/G, G*L, d): G sequences side by side
            mask = block_causal_mask(G, L, x.device)  # (G*L, G*L)
        n, l = x.shape[:2]
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (n, l, d)
        # (n, l, d) -> (n, nh, l, hs)
        q, k, v = (t.view(n, l, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v, mask = cache.append(layer, k, v)  # (n, nh, S, hs), mask None (causal) or a bias (l, S)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # (n, nh, l, hs)
        elif cache is not None or packs_short_sequences(x.device):  # one fused kernel
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (n, nh, l, hs)
        else:
            y = written_out_attention(q, k, v, mask, dropout)  # (n, nh, l, hs)
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

    def __init__(self, d_model: int, n_heads: int, d_hidden: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, d_hidden, dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A causal decoder stack: ``n_layers`` blocks and a final LayerNorm.

    Used for MEGABYTE's global model, its local model and the byte-level baseline.
    ``autocast_residual``: under autocast, carry the residual stream in autocast's dtype.
    ``activation_checkpointing`` (set from outside: ``megabyte.lm.apply_memory_options``): while
    gradients are recorded, keep only each block's input and recompute the block in the backward pass.
    """

    def __init__(
        self, d_model: int, n_layers: int, n_heads: int, d_hidden: int, dropout: float, autocast_residual: bool = True
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_hidden, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.autocast_residual = autocast_residual
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, checkpoint_blocks: bool = True) -> torch.Tensor:
        """x: (N, L, d_model) -> (N, L, d_model), position l attends to positions <= l.

        With a ``cache`` (from ``new_cache``), x continues the cached positions. ``checkpoint_blocks``
        False: no block is recomputed on its own (a caller recomputes the whole stack).
        """
        if self.autocast_residual and torch.is_autocast_enabled(x.device.type):
            # Every norm and residual add reads and writes the residual stream: in bf16 rather than the
            # float32 of the embeddings, half the memory traffic (norms still compute in float32).
            x = x.to(torch.get_autocast_dtype(x.device.type))
        recompute = self.activation_checkpointing and checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            # Non-reentrant checkpointing: composes with torch.compile (one graph) and autocast.
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def new_cache(self, max_len: int) -> KVCache:
        """An empty key/value cache of every block, for decoding up to ``max_len`` positions."""
        return KVCache(len(self.blocks), max_len)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _multiple_hint(value: int, base: int) -> str:
    """Valid values near ``value`` that are multiples of ``base``, for error messages."""
    lower = value // base * base
    return f"{lower} or {lower + base}" if lower > 0 else f"{base}"


@dataclass
class ModelConfig:
    """Options shared by MegaByteConfig and ByteTransformerConfig (the CLI picks one by class_path)."""

    max_seq_len: int = 8192
    """Longest sequence in bytes (T). Linked to ``data.seq_len`` in the CLI."""
    ffn_ratio: int = 4
    """Hidden width of every feed-forward layer, as a multiple of its model width."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches (none on embeddings). The paper trains with
    0.1 (configs/enwik8.yaml); 0 keeps a bare model deterministic and suits short runs."""
    init_std: float = 0.006
    """Standard deviation of the truncated-normal init (truncated at 2 sigma); the paper's 0.006."""
    tie_embeddings: bool = True
    """Tie the output projection to the (local) byte embedding, as in the paper."""
    autocast_residual: bool = True
    """Under autocast (``precision: bf16-mixed``), carry the residual stream of every Transformer stack in
    bf16: half the memory traffic of its norms and adds, which bound the local model's speed on a GPU.
    False keeps it in float32 (the embeddings' dtype). No effect without autocast."""

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{name} must be a positive integer, got {value!r}",
            )

    def _check_multiple(self, name: str, base_name: str, why: str = "") -> None:
        value, base = getattr(self, name), getattr(self, base_name)
        _require(
            value % base == 0,
            f"{name} {value} is not a multiple of {base_name} {base}{why}: use {name} {_multiple_hint(value, base)}",
        )

    def __post_init__(self) -> None:
        self._check_positive("max_seq_len", "ffn_ratio")
        _require(
            0.0 <= self.dropout < 1.0,
            f"dropout must be in [0, 1), got {self.dropout!r} (the paper uses 0.1)",
        )
        _require(
            self.init_std > 0.0,
            f"init_std must be positive, got {self.init_std!r} (the paper uses 0.006)",
        )


@dataclass
class MegaByteConfig(ModelConfig):
    """Hyperparameters of a MEGABYTE model (paper Section 2)."""

    patch_size: int = 8
    """Bytes per patch (P); ``max_seq_len`` must be a multiple. The paper: 8 for text, 12 for ImageNet 64, 32 for audio."""
    d_global: int = 1024
    """Width of the global model (P * D_G); a multiple of ``patch_size`` and of ``n_global_heads``."""
    n_global_layers: int = 12
    """Number of blocks in the global model."""
    n_global_heads: int = 16
    """Attention heads in the global model."""
    d_local: int = 512
    """Width of the local model; a multiple of ``n_local_heads``."""
    n_local_layers: int = 6
    """Number of blocks in the local model."""
    n_local_heads: int = 8
    """Attention heads in the local model."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive(
            "patch_size", "d_global", "n_global_layers", "n_global_heads", "d_local", "n_local_layers", "n_local_heads"
        )
        self._check_multiple("max_seq_len", "patch_size", " (max_seq_len is data.seq_len in the CLI)")
        self._check_multiple("d_global", "patch_size", " (every byte gets d_global / patch_size global dimensions)")
        self._check_multiple("d_global", "n_global_heads")
        self._check_multiple("d_local", "n_local_heads")
        # Each patch's global output (d_global wide) is projected into the local model's P positions; a
        # local model wider than the global one would spend more on a byte than the model spends on its patch.
        _require(
            self.d_local <= self.d_global,
            f"d_local {self.d_local} is wider than d_global {self.d_global}: use d_local <= d_global "
            f"(e.g. d_local {max(self.n_local_heads, self.d_global // 2 // self.n_local_heads * self.n_local_heads)})",
        )


@dataclass
class ByteTransformerConfig(ModelConfig):
    """Hyperparameters of the byte-level decoder-only Transformer baseline."""

    d_model: int = 768
    """Model width; a multiple of ``n_heads``."""
    n_layers: int = 12
    """Number of blocks."""
    n_heads: int = 12
    """Attention heads."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("d_model", "n_layers", "n_heads")
        self._check_multiple("d_model", "n_heads")


def init_weights(model: nn.Module, std: float) -> None:
    """The paper's init: every weight matrix, embedding and pad vector ~ N(0, std) truncated
    at 2 std; biases 0; LayerNorm scale 1 and shift 0."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm) and name == "weight":
                nn.init.ones_(param)
            elif name == "bias":
                nn.init.zeros_(param)
            else:
                nn.init.trunc_normal_(param, mean=0.0, std=std, a=-2 * std, b=2 * std)


def output_logits(h: torch.Tensor, embedding: nn.Embedding, lm_head: nn.Linear | None) -> torch.Tensor:
    """h (..., d) -> byte logits (..., 256), through ``lm_head`` or, when tied, the byte embedding."""
    return F.linear(h, embedding.weight) if lm_head is None else lm_head(h)


def _check_input(x: torch.Tensor, max_seq_len: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"expected x of shape (B, T), got {tuple(x.shape)}")
    if x.dtype != torch.long:
        raise TypeError(f"expected x of dtype torch.long (byte values 0..255), got {x.dtype}")
    if not 1 <= x.shape[1] <= max_seq_len:
        raise ValueError(f"sequence length {x.shape[1]} is outside 1..max_seq_len ({max_seq_len})")


class ByteModel(nn.Module):
    """What both architectures share: sampling bytes one at a time from their key/value-cached
    decoders (``megabyte/generation.py``). Subclasses implement ``forward``, ``prefill``,
    ``decode_step`` and ``decode_kind``."""

    config: ModelConfig

    def prefill(self, prompt: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """prompt LongTensor (B, n), 0 <= n < max_seq_len -> (logits (B, 256) of byte n, decoding state)."""
        raise NotImplementedError

    def decode_step(self, byte: torch.Tensor, kind: int, state: dict) -> torch.Tensor:
        """byte: LongTensor (B,), the byte chosen at position t - 1 -> logits (B, 256) of byte t.
        Positions live in ``state`` on the device; ``kind`` is ``decode_kind(t)``."""
        raise NotImplementedError

    def decode_kind(self, t: int) -> int:
        """The kind of the step that decodes byte t: steps of one kind run the same device code (one
        compilation and CUDA graph each)."""
        return 0

    def generate(
        self,
        prompt: torch.Tensor,
        max_new_bytes: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        cuda_graphs: bool | None = None,
        compile: bool = False,
    ) -> torch.Tensor:
        """Continue ``prompt`` by ``max_new_bytes`` sampled bytes.

        prompt: LongTensor (B, n), values 0..255 (n may be 0); n + max_new_bytes <= max_seq_len.
        temperature: 0 is greedy decoding; top_k / top_p restrict sampling.
        generator: the random generator of the sampling, for reproducible samples.
        cuda_graphs: replay each decoding step as a CUDA graph; None: on a GPU.
        compile: fuse each kind of decoding step with ``torch.compile`` (about a minute, once per
            process, kind of step, batch size and sampling setting: pays for long or repeated generations).
        Under autocast (e.g. Lightning's bf16-mixed), a copy of the model in autocast's dtype decodes.
        Returns LongTensor (B, n + max_new_bytes): the prompt followed by the new bytes.
        The model runs in eval mode (no dropout) and is put back in its previous mode.
        """
        from megabyte.generation import generate  # generation.py builds on this module

        return generate(self, prompt, max_new_bytes, temperature, top_k, top_p, generator, cuda_graphs, compile)


class MegaByte(ByteModel):
    """MEGABYTE: a global transformer over patches of P bytes and a local transformer
    that predicts the bytes inside each patch.

    ``local_chunk_patches`` (set from outside: ``megabyte.lm.apply_memory_options``): run the local
    model over at most this many patches at a time; with ``local_model.activation_checkpointing``
    each chunk is then recomputed as a whole in the backward pass, so the local model keeps one
    chunk's activations instead of all B*K patches'. None runs every patch at once.
    """

    def __init__(self, config: MegaByteConfig) -> None:
        super().__init__()
        self.config = config
        P, d_global, d_local = config.patch_size, config.d_global, config.d_local
        D_G = d_global // P

        # 1. Patch embedder: per-byte global embedding plus learned absolute positions.
        self.global_embedding = nn.Embedding(VOCAB_SIZE, D_G)  # E_global (V, D_G)
        self.global_pos_embedding = nn.Embedding(config.max_seq_len, D_G)  # E_pos (T, D_G)
        # 2. Trainable pad patch that starts the global input.
        self.global_pad = nn.Parameter(torch.empty(d_global))
        # 3. Causal global model over K patch positions.
        self.global_model = Transformer(
            d_global, config.n_global_layers, config.n_global_heads, config.ffn_ratio * d_global, config.dropout,
            config.autocast_residual,
        )
        # 4. Shared projection w_GL of each D_G chunk of a global output to the local width.
        self.global_to_local = nn.Linear(D_G, d_local)
        # 5. Local input: previous-byte embedding, local pad at patch position 0, positions.
        self.local_embedding = nn.Embedding(VOCAB_SIZE, d_local)  # E_local (V, d_local)
        self.local_pad = nn.Parameter(torch.empty(d_local))
        self.local_pos_embedding = nn.Embedding(P, d_local)
        # 6. Causal local model, run on every patch independently.
        self.local_model = Transformer(
            d_local, config.n_local_layers, config.n_local_heads, config.ffn_ratio * d_local, config.dropout,
            config.autocast_residual,
        )
        # 7. Output projection, tied to E_local unless configured otherwise.
        self.lm_head = None if config.tie_embeddings else nn.Linear(d_local, VOCAB_SIZE, bias=False)
        init_weights(self, config.init_std)
        self.local_chunk_patches: int | None = None

    def embed_patches(self, x: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """Patch embedder. x: LongTensor (B, k*P), bytes from position ``start`` (an int or a 0-dim
        device tensor) on -> (B, k, d_global): per-byte global embeddings plus positions, concatenated per patch."""
        B, L = x.shape
        positions = torch.arange(L, device=x.device) + start
        h = self.global_embedding(x) + self.global_pos_embedding(positions)  # (B, k*P, D_G)
        return h.view(B, L // self.config.patch_size, self.config.d_global)  # (B, k, d_global)

    def local_input(self, context: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Input of the local model at patch positions 0..L-1 (L <= P).

        context: (..., L, d_local), the projected global output for those positions.
        prev: LongTensor (..., L - 1), the bytes before positions 1..L of the patch.
        Returns context + previous-byte embedding (the local pad at p = 0) + position: (..., L, d_local).
        """
        L = context.shape[-2]
        pad = self.local_pad.expand(*prev.shape[:-1], 1, self.config.d_local)  # (..., 1, d_local)
        prev = torch.cat([pad, self.local_embedding(prev)], dim=-2)  # (..., L, d_local)
        return context + prev + self.local_pos_embedding.weight[:L]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: LongTensor (B, T), values 0..255, 1 <= T <= max_seq_len -> logits (B, T, 256).

        ``logits[:, t]`` is the prediction of ``x[:, t]`` from ``x[:, :t]``.
        """
        _check_input(x, self.config.max_seq_len)
        B, T = x.shape
        P, d_global = self.config.patch_size, self.config.d_global
        K = math.ceil(T / P)
        # Pad to whole patches; causality keeps the padding out of every real position.
        x = F.pad(x, (0, K * P - T))  # (B, K*P)

        # 1. Patch embedder: (B, K*P, D_G) concatenated per patch into (B, K, P*D_G).
        h = self.embed_patches(x)  # (B, K, d_global)
        # 2. Shift by one patch: prepend the pad patch, drop the last patch.
        pad = self.global_pad.expand(B, 1, d_global)  # (B, 1, d_global)
        h = torch.cat([pad, h[:, :-1]], dim=1)  # (B, K, d_global)
        # 3. Global model: position k has seen patches < k only.
        h = self.global_model(h)  # (B, K, d_global)

        # 4-7. Local model over all B*K patches as one batch, or over chunks of them.
        h, x = h.view(B * K, d_global), x.view(B * K, P)  # (B*K, d_global), (B*K, P)
        if self.local_chunk_patches is None:
            logits = self.local_logits(h, x)  # (B*K, P, V)
        else:
            chunks = zip(h.split(self.local_chunk_patches), x.split(self.local_chunk_patches))
            logits = torch.cat([self.local_chunk_logits(h_c, x_c) for h_c, x_c in chunks])  # (B*K, P, V)
        return logits.view(B, K * P, VOCAB_SIZE)[:, :T]  # drop the padding

    def local_logits(self, h: torch.Tensor, x: torch.Tensor, checkpoint_blocks: bool = True) -> torch.Tensor:
        """Steps 4-7 for N patches. h: (N, d_global) their global outputs, x: LongTensor (N, P) their
        bytes -> logits (N, P, 256)."""
        N, P, d_global = x.shape[0], self.config.patch_size, self.config.d_global
        # 4. Split every global output into P chunks of D_G and project each with w_GL.
        h = self.global_to_local(h.view(N, P, d_global // P))  # (N, P, d_local)
        # 5. Add the embedding of the previous byte in the patch (the local pad at p = 0).
        h = self.local_input(h, x[:, :-1])  # (N, P, d_local)
        # 6. Local model over the N patches as one batch of length-P sequences.
        h = self.local_model(h, checkpoint_blocks=checkpoint_blocks)  # (N, P, d_local)
        # 7. Output projection to byte logits.
        return output_logits(h, self.local_embedding, self.lm_head)  # (N, P, V)

    def local_chunk_logits(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``local_logits`` of one chunk of patches; with the local model's activation checkpointing,
        the whole chunk is recomputed in the backward pass (its blocks then keep no input of their own)."""
        if self.local_model.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.local_logits, h, x, False, use_reentrant=False)
        return self.local_logits(h, x)

    # -- decoding with key/value caches: the global model once per patch, the local one per byte --

    def _global_context(self, h: torch.Tensor, state: dict) -> torch.Tensor:
        """h (B, L, d_global) global inputs after the cached ones -> projected output of the last
        position, the context of the patch being decoded: (B, P, d_local)."""
        B, P = h.shape[0], self.config.patch_size
        h = self.global_model(h, state["global"])[:, -1]  # (B, d_global)
        return self.global_to_local(h.view(B, P, -1))  # (B, P, d_local)

    def prefill(self, prompt: torch.Tensor) -> tuple[torch.Tensor, dict]:
        B, n = prompt.shape
        P = self.config.patch_size
        c, r = divmod(n, P)  # c whole patches, r bytes of the current one
        state = {
            "global": self.global_model.new_cache(self.config.max_seq_len // P),
            "local": self.local_model.new_cache(P),
            "patch": prompt.new_zeros(B, P),  # (B, P) the bytes of the current patch so far
            "position": torch.tensor(n + 1, device=prompt.device),  # t of the next decode_step
        }
        state["patch"][:, :r] = prompt[:, c * P :]
        pad = self.global_pad.expand(B, 1, self.config.d_global)  # (B, 1, d_global)
        h = torch.cat([pad, self.embed_patches(prompt[:, : c * P])], dim=1)  # (B, c+1, d_global)
        state["context"] = self._global_context(h, state)  # (B, P, d_local)
        h = self.local_input(state["context"][:, : r + 1], state["patch"][:, :r])  # (B, r+1, d_local)
        h = self.local_model(h, state["local"])[:, -1]  # (B, d_local)
        return output_logits(h, self.local_embedding, self.lm_head), state

    def decode_kind(self, t: int) -> int:
        """1 where byte t starts a patch (the global model runs first), else 0."""
        return int(t % self.config.patch_size == 0)

    def decode_step(self, byte: torch.Tensor, kind: int, state: dict) -> torch.Tensor:
        P = self.config.patch_size
        p = (state["position"] % P).view(1)  # (1,) position of byte t in its patch, on the device
        p_prev = (p - 1) % P  # (1,) position of byte t - 1, the last of its patch when p = 0
        state["patch"].index_copy_(1, p_prev, byte[:, None])
        if kind == 1:  # a patch is complete: the global model reads it, the local model starts afresh
            h = self.embed_patches(state["patch"], state["position"] - P)  # (B, 1, d_global)
            state["context"].copy_(self._global_context(h, state))
            state["local"].reset()
        prev = self.local_embedding(state["patch"].index_select(1, p_prev))  # (B, 1, d_local)
        prev = torch.where(p == 0, self.local_pad, prev)  # the local pad at patch position 0
        h = state["context"].index_select(1, p) + prev + self.local_pos_embedding(p)  # (B, 1, d_local)
        h = self.local_model(h, state["local"])[:, -1]  # (B, d_local)
        state["position"].add_(1)
        return output_logits(h, self.local_embedding, self.lm_head)


class ByteTransformer(ByteModel):
    """Byte-level decoder-only Transformer: the baseline MEGABYTE is compared against.

    Built from the same blocks; the input is shifted by one byte behind a trainable start vector.
    """

    def __init__(self, config: ByteTransformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embedding = nn.Embedding(VOCAB_SIZE, d)
        self.pos_embedding = nn.Embedding(config.max_seq_len, d)
        self.start = nn.Parameter(torch.empty(d))
        self.transformer = Transformer(
            d, config.n_layers, config.n_heads, config.ffn_ratio * d, config.dropout, config.autocast_residual
        )
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, VOCAB_SIZE, bias=False)
        init_weights(self, config.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: LongTensor (B, T), values 0..255, 1 <= T <= max_seq_len -> logits (B, T, 256)."""
        _check_input(x, self.config.max_seq_len)
        h = self.transformer(self.shifted_input(x[:, :-1]))  # (B, T, d): position t sees x[:, t-1]
        return output_logits(h, self.embedding, self.lm_head)  # (B, T, V)

    def shifted_input(self, prev: torch.Tensor) -> torch.Tensor:
        """prev: LongTensor (B, L-1) -> input (B, L, d): start vector, then byte embeddings, plus positions."""
        start = self.start.expand(prev.shape[0], 1, self.config.d_model)  # (B, 1, d)
        h = torch.cat([start, self.embedding(prev)], dim=1)  # (B, L, d)
        return h + self.pos_embedding(torch.arange(h.shape[1], device=h.device))

    def prefill(self, prompt: torch.Tensor) -> tuple[torch.Tensor, dict]:
        state = {
            "cache": self.transformer.new_cache(self.config.max_seq_len),
            "position": torch.tensor(prompt.shape[1] + 1, device=prompt.device),  # input position of the next byte
        }
        h = self.transformer(self.shifted_input(prompt), state["cache"])[:, -1]  # (B, d)
        return output_logits(h, self.embedding, self.lm_head), state

    def decode_step(self, byte: torch.Tensor, kind: int, state: dict) -> torch.Tensor:
        h = self.embedding(byte[:, None]) + self.pos_embedding(state["position"])  # (B, 1, d)
        h = self.transformer(h, state["cache"])[:, -1]  # (B, d)
        state["position"].add_(1)
        return output_logits(h, self.embedding, self.lm_head)


def build_model(config: ModelConfig) -> ByteModel:
    """The architecture a config describes."""
    if isinstance(config, MegaByteConfig):
        return MegaByte(config)
    if isinstance(config, ByteTransformerConfig):
        return ByteTransformer(config)
    raise TypeError(f"expected a MegaByteConfig or a ByteTransformerConfig, got {type(config).__name__}")
