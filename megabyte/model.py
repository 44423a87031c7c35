"""MEGABYTE (Yu et al., 2023) and the byte-level Transformer it is compared against.

MegaByte reads like Section 2 of the paper: patch embedder -> global model -> local model, steps 1-7
in ``forward``. Symbols follow the paper: V = 256 byte values, T = sequence length, P = patch_size,
K = T / P patches, D_G = d_global / P (per-byte global width).

Both models share one contract: ``forward(x)`` with ``x: LongTensor (B, T)``, values 0..255, returns
logits ``(B, T, 256)`` where ``logits[:, t]`` predicts ``x[:, t]`` from ``x[:, :t]``. The targets are
the input itself; no external shift is needed. ``prefill`` / ``decode_step`` decode with key/value
caches, one byte a step; ``megabyte.generation.generate`` samples with them.

Nothing here decides how the model runs (activation checkpointing, chunks, compilation, sharding):
``megabyte.parallelize`` applies that from outside.
"""

import enum
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megabyte.attention import ShortAttention

# The configs are re-exported: checkpoints written before they had a module of their own name
# ``megabyte.model.MegaByteConfig``.
from megabyte.config import VOCAB_SIZE, ByteTransformerConfig, MegaByteConfig, ModelConfig
from megabyte.transformer import KVCache, Transformer

__all__ = [
    "VOCAB_SIZE", "ByteModel", "ByteTransformer", "ByteTransformerConfig", "ByteTransformerDecodeState", "MegaByte",
    "MegaByteConfig", "MegaByteDecodeState", "ModelConfig", "StepKind", "build_model",
]  # fmt: skip


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


class StepKind(enum.IntEnum):
    """What a decoding step runs. Steps of one kind run the same device code whatever the position
    (one compilation and one CUDA graph each)."""

    NEXT_BYTE = 0
    """The local model (MegaByte) or the stack (ByteTransformer) reads the previous byte."""
    NEW_PATCH = 1
    """MegaByte: the previous byte completed a patch; the global model reads it first."""


class ByteModel(nn.Module):
    """What both architectures share: decoding bytes one at a time with key/value caches, the
    interface ``megabyte.generation.generate`` samples through."""

    config: ModelConfig

    def prefill(self, prompt: torch.Tensor, max_len: int | None = None) -> tuple[torch.Tensor, object]:
        """prompt LongTensor (B, n), 0 <= n < max_len -> (logits (B, 256) of byte n, the decode
        state of the next ``decode_step``). ``max_len`` (default and at most max_seq_len): the longest
        sequence the state will decode, which sizes its key/value caches."""
        raise NotImplementedError

    def decode_step(self, byte: torch.Tensor, kind: StepKind, state: object) -> torch.Tensor:
        """byte: LongTensor (B,), the byte chosen at position t - 1 -> logits (B, 256) of byte t.
        Positions live in ``state`` on the device; ``kind`` is ``step_kind(t)``.

        The step attends over the whole key/value buffers (``max_seq_len`` positions) unless
        ``narrow_attention(state, t)`` was called before it: a caller that knows t on the host calls
        that before every step (it costs nothing on the device) to attend over the filled part only."""
        raise NotImplementedError

    def step_kind(self, t: int) -> StepKind:
        """The kind of the step that decodes byte t."""
        return StepKind.NEXT_BYTE

    def narrow_attention(self, state: object, t: int) -> int | None:
        """Let the step that decodes byte t (and the later ones, until the window is outgrown) attend
        over a window of the caches of ``state`` that holds every position it reads, rather than their
        whole buffers (``KVCache.narrow``). -> the window's length, which selects the step's CUDA graph
        together with its kind; None where this step's attention reads no growing cache."""
        return None


@dataclass
class MegaByteDecodeState:
    """Where MegaByte's decoding stands, all on the device (a step never reads it on the host)."""

    global_cache: KVCache
    """The global model's keys and values of the patches read so far."""
    local_cache: KVCache
    """The local model's keys and values of the current window's bytes (with cross-patch attention, the
    previous patch's last r, then the current patch's)."""
    patch: torch.Tensor
    """LongTensor (B, P): the bytes of the current patch so far."""
    position: torch.Tensor
    """0-dim LongTensor: t of the next ``decode_step``."""
    context: torch.Tensor
    """(B, P, d_local): the global model's projected output for the current patch (at a new patch,
    before it is overwritten, the previous patch's: cross-patch attention reads its last r)."""


class MegaByte(ByteModel):
    """MEGABYTE: a global transformer over patches of P bytes and a local transformer
    that predicts the bytes inside each patch.

    ``short_attention``: the attention backend of sequences up to ``SHORT_SEQUENCE`` long, the local
    model's patches (``megabyte.attention``); it changes speed, not what is computed.

    Cross-patch attention (``cross_patch_bytes`` r > 0, the paper's option): the local model of patch k
    runs over a window of r + P positions, bytes kP - r .. kP + P - 1: the last r bytes of patch k - 1,
    then its own P. Every position of the window has the local input of step 5: the projected global
    output of the byte's own patch (k - 1 for the first r) plus the embedding of the byte before it, the
    local pad at the window's first position only. So the first byte of a patch reads the last byte of
    the previous one, which the global model has seen only inside a whole patch vector ("patch lag");
    with r = 0 the window is the patch and this is the paper's main model. Only the last P positions
    predict (the first r are patch k - 1's, predicted by its own window). Before the first patch the
    window holds r zero bytes with a zero global output.
    The first r positions are recomputed in each window, not read from patch k - 1's local model: past
    its first layer a position of the window attends within the window only, and the patches stay
    independent given their inputs, so every short-attention backend, activation checkpointing and
    chunked local models run unchanged. The price: the local model's linear layers do (r + P) / P times
    their work and its attention ((r + P) / P)^2, where attending to patch k - 1's cached keys and
    values would add only P x r attention scores (but chain each patch to the previous one).
    """

    def __init__(self, config: MegaByteConfig, short_attention: ShortAttention = "auto") -> None:
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
            config.autocast_residual, short_attention,
        )
        # 4. Shared projection w_GL of each D_G chunk of a global output to the local width.
        self.global_to_local = nn.Linear(D_G, d_local)
        # 5. Local input: previous-byte embedding, local pad at patch position 0, positions.
        self.local_embedding = nn.Embedding(VOCAB_SIZE, d_local)  # E_local (V, d_local)
        self.local_pad = nn.Parameter(torch.empty(d_local))
        self.local_pos_embedding = nn.Embedding(config.cross_patch_bytes + P, d_local)  # window positions
        # 6. Causal local model, run on every patch independently.
        self.local_model = Transformer(
            d_local, config.n_local_layers, config.n_local_heads, config.ffn_ratio * d_local, config.dropout,
            config.autocast_residual, short_attention,
        )
        # 7. Output projection, tied to E_local unless configured otherwise.
        self.lm_head = None if config.tie_embeddings else nn.Linear(d_local, VOCAB_SIZE, bias=False)
        init_weights(self, config.init_std)

    def embed_patches(self, x: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """Patch embedder. x: LongTensor (B, k*P), bytes from position ``start`` (an int or a 0-dim
        device tensor) on -> (B, k, d_global): per-byte global embeddings plus positions, concatenated per patch."""
        B, L = x.shape
        positions = torch.arange(L, device=x.device) + start
        h = self.global_embedding(x) + self.global_pos_embedding(positions)  # (B, k*P, D_G)
        return h.view(B, L // self.config.patch_size, self.config.d_global)  # (B, k, d_global)

    def local_input(self, context: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Input of the local model at window positions 0..L-1 (L <= r + P; without cross-patch
        attention the window is the patch).

        context: (..., L, d_local), the projected global output for those positions.
        prev: LongTensor (..., L - 1), the bytes before positions 1..L-1 of the window.
        Returns context + previous-byte embedding (the local pad at position 0) + position: (..., L, d_local).
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

        # 4-7. Local model over all B*K patches as one batch: P chunks of D_G per global output.
        r = self.config.cross_patch_bytes
        h, x = h.view(B, K, P, d_global // P), x.view(B, K, P)  # (B, K, P, D_G), (B, K, P)
        if r > 0:  # each window starts with the previous patch's last r bytes (zeros before the first)
            h = torch.cat([F.pad(h[:, :-1, P - r :], (0, 0, 0, 0, 1, 0)), h], dim=2)  # (B, K, r+P, D_G)
            x = torch.cat([F.pad(x[:, :-1, P - r :], (0, 0, 1, 0)), x], dim=2)  # (B, K, r+P)
        logits = self.local_logits(h.view(B * K, r + P, -1), x.view(B * K, r + P))  # (B*K, P, V)
        return logits.view(B, K * P, VOCAB_SIZE)[:, :T]  # drop the padding

    def local_logits(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Steps 4-7 for N windows of r + P bytes (r = ``cross_patch_bytes``; the patch itself when 0),
        each independent of the others. h: (N, r+P, D_G) the chunk of its patch's global output for every
        byte, x: LongTensor (N, r+P) the bytes -> logits (N, P, 256) of the window's last P bytes."""
        r = self.config.cross_patch_bytes
        # 4. Project every D_G chunk of the global outputs with w_GL.
        h = self.global_to_local(h)  # (N, r+P, d_local)
        # 5. Add the embedding of the previous byte in the window (the local pad at its start).
        h = self.local_input(h, x[:, :-1])  # (N, r+P, d_local)
        # 6. Local model over the N windows as one batch of length-(r+P) sequences.
        h = self.local_model(h)[:, r:]  # (N, P, d_local): the patch's own positions
        # 7. Output projection to byte logits.
        return output_logits(h, self.local_embedding, self.lm_head)  # (N, P, V)

    # -- decoding with key/value caches: the global model once per patch, the local one per byte --

    def _global_context(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """h (B, L, d_global) global inputs after the cached ones -> projected output of the last
        position, the context of the patch being decoded: (B, P, d_local)."""
        B, P = h.shape[0], self.config.patch_size
        h = self.global_model(h, cache)[:, -1]  # (B, d_global)
        return self.global_to_local(h.view(B, P, -1))  # (B, P, d_local)

    def prefill(self, prompt: torch.Tensor, max_len: int | None = None) -> tuple[torch.Tensor, MegaByteDecodeState]:
        B, n = prompt.shape
        P, d_global, r = self.config.patch_size, self.config.d_global, self.config.cross_patch_bytes
        c, m = divmod(n, P)  # c whole patches, m bytes of the current one
        # byte t reads global positions 0..t // P (the pad, then the patches before its own)
        global_cache = self.global_model.new_cache(-(-(max_len or self.config.max_seq_len) // P))
        patch = prompt.new_zeros(B, P)
        patch[:, :m] = prompt[:, c * P :]
        pad = self.global_pad.expand(B, 1, d_global)  # (B, 1, d_global)
        h = torch.cat([pad, self.embed_patches(prompt[:, : c * P])], dim=1)  # (B, c+1, d_global)
        h = self.global_model(h, global_cache)  # (B, c+1, d_global)
        state = MegaByteDecodeState(
            global_cache=global_cache,
            local_cache=self.local_model.new_cache(r + P),
            patch=patch,
            position=torch.tensor(n + 1, device=prompt.device),
            context=self.global_to_local(h[:, -1].view(B, P, -1)),  # (B, P, d_local)
        )
        context, prev = state.context[:, : m + 1], patch[:, :m]  # (B, m+1, d_local), (B, m)
        if r > 0:  # the window starts with the previous patch's last r bytes (zeros before the first)
            before = h[:, -2] if c > 0 else h.new_zeros(B, d_global)  # (B, d_global) patch c-1's global output
            before = self.global_to_local(before.view(B, P, -1)[:, P - r :])  # (B, r, d_local)
            context = torch.cat([before, context], dim=1)  # (B, r+m+1, d_local)
            bytes_before = prompt[:, c * P - r : c * P] if c > 0 else prompt.new_zeros(B, r)  # (B, r)
            prev = torch.cat([bytes_before, prev], dim=1)  # (B, r+m)
        h = self.local_input(context, prev)  # (B, r+m+1, d_local)
        h = self.local_model(h, state.local_cache)[:, -1]  # (B, d_local)
        return output_logits(h, self.local_embedding, self.lm_head), state

    def step_kind(self, t: int) -> StepKind:
        """NEW_PATCH where byte t starts a patch (the global model runs first), else NEXT_BYTE."""
        return StepKind.NEW_PATCH if t % self.config.patch_size == 0 else StepKind.NEXT_BYTE

    def narrow_attention(self, state: MegaByteDecodeState, t: int) -> int | None:
        """A step of a new patch reads global positions 0..t/P (the pad, then t/P patches); the others
        read no global cache. The local cache, a window of r + P bytes, is read whole."""
        if self.step_kind(t) != StepKind.NEW_PATCH:
            return None
        return state.global_cache.narrow(t // self.config.patch_size + 1)

    def decode_step(self, byte: torch.Tensor, kind: StepKind, state: MegaByteDecodeState) -> torch.Tensor:
        P, r = self.config.patch_size, self.config.cross_patch_bytes
        p = (state.position % P).view(1)  # (1,) position of byte t in its patch, on the device
        p_prev = (p - 1) % P  # (1,) position of byte t - 1, the last of its patch when p = 0
        state.patch.index_copy_(1, p_prev, byte[:, None])
        if kind == StepKind.NEW_PATCH:  # a patch is complete: the global model reads it, the local model starts afresh
            h = self.embed_patches(state.patch, state.position - P)  # (B, 1, d_global)
            context = self._global_context(h, state.global_cache)  # (B, P, d_local)
            state.local_cache.reset()
            # The new window: the finished patch's last r bytes (none without cross-patch attention), then byte t.
            h = torch.cat([state.context[:, P - r :], context[:, :1]], dim=1)  # (B, r+1, d_local)
            h = self.local_input(h, state.patch[:, P - r :])  # (B, r+1, d_local), the local pad first
            state.context.copy_(context)
        else:  # p > 0
            prev = self.local_embedding(state.patch.index_select(1, p_prev))  # (B, 1, d_local)
            h = state.context.index_select(1, p) + prev + self.local_pos_embedding(p + r)  # (B, 1, d_local)
        h = self.local_model(h, state.local_cache)[:, -1]  # (B, d_local)
        state.position.add_(1)
        return output_logits(h, self.local_embedding, self.lm_head)


@dataclass
class ByteTransformerDecodeState:
    """Where the ByteTransformer's decoding stands, on the device."""

    cache: KVCache
    """The stack's keys and values of every position so far."""
    position: torch.Tensor
    """0-dim LongTensor: the input position of the next byte."""


class ByteTransformer(ByteModel):
    """Byte-level decoder-only Transformer: the baseline MEGABYTE is compared against.

    Built from the same blocks; the input is shifted by one byte behind a trainable start vector.
    ``short_attention``: the attention backend of sequences up to ``SHORT_SEQUENCE`` (``megabyte.attention``).
    """

    def __init__(self, config: ByteTransformerConfig, short_attention: ShortAttention = "auto") -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embedding = nn.Embedding(VOCAB_SIZE, d)
        self.pos_embedding = nn.Embedding(config.max_seq_len, d)
        self.start = nn.Parameter(torch.empty(d))
        self.transformer = Transformer(
            d, config.n_layers, config.n_heads, config.ffn_ratio * d, config.dropout, config.autocast_residual,
            short_attention,
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

    def prefill(self, prompt: torch.Tensor, max_len: int | None = None) -> tuple[torch.Tensor, ByteTransformerDecodeState]:
        state = ByteTransformerDecodeState(
            cache=self.transformer.new_cache(max_len or self.config.max_seq_len),
            position=torch.tensor(prompt.shape[1] + 1, device=prompt.device),
        )
        h = self.transformer(self.shifted_input(prompt), state.cache)[:, -1]  # (B, d)
        return output_logits(h, self.embedding, self.lm_head), state

    def narrow_attention(self, state: ByteTransformerDecodeState, t: int) -> int | None:
        """The step that decodes byte t reads positions 0..t (the start vector, then bytes 0..t-1)."""
        return state.cache.narrow(t + 1)

    def decode_step(self, byte: torch.Tensor, kind: StepKind, state: ByteTransformerDecodeState) -> torch.Tensor:
        h = self.embedding(byte[:, None]) + self.pos_embedding(state.position)  # (B, 1, d)
        h = self.transformer(h, state.cache)[:, -1]  # (B, d)
        state.position.add_(1)
        return output_logits(h, self.embedding, self.lm_head)


def build_model(config: ModelConfig, short_attention: ShortAttention = "auto") -> ByteModel:
    """The architecture a config describes."""
    if isinstance(config, MegaByteConfig):
        return MegaByte(config, short_attention)
    if isinstance(config, ByteTransformerConfig):
        return ByteTransformer(config, short_attention)
    raise TypeError(f"expected a MegaByteConfig or a ByteTransformerConfig, got {type(config).__name__}")
