"""megabyte/attention.py: the backends of attention over many short sequences compute the same thing,
and the one "auto" stands for follows the device and the dropout."""

import pytest
import torch

from megabyte import attention
from megabyte.transformer import Transformer


@pytest.mark.parametrize("N", [24, 7])  # packs of 12 and of 7 patches (at most 128 / 8)
def test_packed_short_sequences_equal_separate_ones(N):
    """The GPU's packing of the local model's patches (G side by side under a block-diagonal mask,
    one fused kernel) gives the outputs and gradients of attending each patch alone."""
    torch.manual_seed(0)
    transformer = Transformer(d_model=16, n_layers=2, n_heads=2, d_hidden=32, dropout=0.0, short_attention="written-out")
    transformer = transformer.double()
    packing = Transformer(d_model=16, n_layers=2, n_heads=2, d_hidden=32, dropout=0.0, short_attention="packed")
    packing = packing.double()
    packing.load_state_dict(transformer.state_dict())
    h = torch.randn(N, 8, 16, dtype=torch.float64, requires_grad=True)
    separate = transformer(h)
    (grad_separate,) = torch.autograd.grad(separate.square().sum(), h)
    assert attention.sequences_per_pack(N, 8) == (12 if N == 24 else 7)
    packed = packing(h)
    (grad_packed,) = torch.autograd.grad(packed.square().sum(), h)
    torch.testing.assert_close(packed, separate)
    torch.testing.assert_close(grad_packed, grad_separate)
    mask = attention.block_causal_mask(2, 3, h.device)
    assert mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1],
    ]  # fmt: skip


def test_auto_takes_the_written_out_matmuls_on_the_cpu_and_the_kernel_only_without_dropout():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.resolve_backend("auto", cpu, 0.0) == "written-out"
    assert attention.resolve_backend("auto", cuda, 0.1) == "packed"
    expected = "kernel" if attention.short_attention_kernel is not None else "packed"
    assert attention.resolve_backend("auto", cuda, 0.0) == expected
    assert attention.resolve_backend("packed", cpu, 0.0) == "packed"
    with pytest.raises(ValueError, match="short_attention 'kernel' needs Triton and no attention dropout"):
        attention.short_causal_attention(torch.randn(2, 8, 48), 2, dropout=0.1, backend="kernel")
