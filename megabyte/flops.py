"""Analytic FLOPs per byte of a training step, for throughput and MFU.

Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts on a GPU over one training step
(forward + backward): every matrix multiplication (2 FLOPs per multiply-add; the backward pass
costs twice the forward) and the attention score / value products at their full square size
(causal masking is not subtracted). Flash attention's backward recomputes the scores, so the
attention products cost 3.5x their forward in a training step, the linear layers 3x. Sequences of
at most ``SHORT_SEQUENCE`` positions (the local model's patches) count as written-out attention
(3x), the model's work: on a GPU a Triton kernel (``megabyte/kernels/short_attention.py``; with attention
dropout, SDPA over packed sequences) attends them in tiles of 64 (128) positions and also multiplies
the masked-out scores between sequences; that extra arithmetic is not counted (it is under 3 % of
config M's FLOPs), and the kernel's ops report this same count to FlopCounterMode. Embedding
lookups, norms and activations are not counted.
"""

from dataclasses import dataclass

from megabyte.attention import SHORT_SEQUENCE
from megabyte.config import VOCAB_SIZE, ByteTransformerConfig, MegaByteConfig, ModelConfig


@dataclass
class ForwardFlops:
    """Forward FLOPs per byte, split by kind."""

    linear: float
    """Linear layers and the output projection."""
    attention: float
    """The two attention products (scores q k^T and scores @ v) in fused attention kernels."""
    short_attention: float = 0.0
    """The same products in written-out attention over short sequences."""

    def training(self) -> float:
        """FLOPs per byte of a training step (forward + backward, flash attention's recompute included)."""
        return 3.0 * self.linear + 3.5 * self.attention + 3.0 * self.short_attention


def _by_kernel(linear: float, *attention: tuple[float, int]) -> ForwardFlops:
    """``attention``: (FLOPs, sequence length) pairs, filed under the kernel that length uses."""
    short = sum(flops for flops, length in attention if length <= SHORT_SEQUENCE)
    return ForwardFlops(linear, sum(flops for flops, _ in attention) - short, short)


def _block_linear(d: int, ffn_ratio: int) -> float:
    """Linear FLOPs of one block per position: q, k, v and output projections (4 d^2) and the
    feed-forward (2 * ffn_ratio * d^2), times 2 FLOPs per multiply-add."""
    return 2.0 * (4 + 2 * ffn_ratio) * d * d


def forward_flops_per_byte(config: ModelConfig, seq_len: int) -> ForwardFlops:
    """Forward FLOPs per byte of ``config``'s model on sequences of ``seq_len`` bytes."""
    if isinstance(config, MegaByteConfig):
        P, D, d = config.patch_size, config.d_global, config.d_local
        K = -(-seq_len // P)  # patches
        L = config.cross_patch_bytes + P  # the local model's window: the previous patch's last r bytes, then P
        # The global model runs once per patch (1 / P per byte) over K positions; the local model over
        # windows of L positions, one per patch: L / P positions per byte (1 without cross-patch attention).
        linear = (
            config.n_global_layers * _block_linear(D, config.ffn_ratio) / P
            + 2.0 * (D // P) * d * L / P  # global-to-local projection of every window position
            + config.n_local_layers * _block_linear(d, config.ffn_ratio) * L / P
            + 2.0 * d * VOCAB_SIZE  # output projection, of the P positions that predict
        )
        return _by_kernel(
            linear, (config.n_global_layers * 4.0 * K * D / P, K), (config.n_local_layers * 4.0 * L * d * L / P, L)
        )
    if isinstance(config, ByteTransformerConfig):
        d = config.d_model
        linear = config.n_layers * _block_linear(d, config.ffn_ratio) + 2.0 * d * VOCAB_SIZE
        return _by_kernel(linear, (config.n_layers * 4.0 * seq_len * d, seq_len))
    raise TypeError(f"no FLOP count for {type(config).__name__}")


def training_flops_per_byte(config: ModelConfig, seq_len: int) -> float:
    """FLOPs per byte of one training step (forward + backward) on sequences of ``seq_len`` bytes."""
    return forward_flops_per_byte(config, seq_len).training()
