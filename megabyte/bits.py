"""The bits a model spends on each byte: the loss of training, the measure of evaluation (bits per
byte, bpb, is their mean), and the paper's strided inference."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megabyte.config import VOCAB_SIZE


def byte_bits(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """logits float (B, T, 256), x long (B, T) -> bits float32 (B, T) spent on every byte."""
    nats = F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), x.reshape(-1), reduction="none")
    return nats.view_as(x) / math.log(2)


def strided_bits(bits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The paper's strided inference: bits float32 (B, T) spent on every byte of x (B, T), from two passes.

    Within a patch the loss rises toward its last bytes. The second pass sees x offset by
    ``patch_size // 2`` bytes, so each byte sits once in the first half of a patch; every byte takes
    its bits from the pass where it does. ``bits_of``: LongTensor (B, T) -> bits (B, T) of one pass.
    Costs two passes; the second sees ``patch_size // 2`` bytes less context at the window's start.
    """
    B, T = x.shape
    half = patch_size // 2
    first = bits_of(x)  # byte t at patch position t % P
    if T <= half:  # no byte reaches the second half of its patch
        return first
    # Drop the first ``half`` bytes and zero-fill the end, so the shape (and a compiled graph) stays.
    second = bits_of(F.pad(x[:, half:], (0, half)))  # byte t at position (t - half) % P, read at t - half
    second = F.pad(second[:, : T - half], (half, 0))  # (B, T) realigned: second[:, t] is byte t's
    late = torch.arange(T, device=x.device) % patch_size >= half  # (T,) the second half of each patch
    return torch.where(late, second, first)
