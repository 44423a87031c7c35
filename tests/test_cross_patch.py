"""Cross-patch local attention (``cross_patch_bytes`` r): causal across patch boundaries, the first byte
of a patch reading the previous patch's last bytes, every attention backend and strided inference the
same; r = 0 the paper's main model, bit for bit. Cached generation: tests/test_generation.py; FLOPs:
tests/test_throughput.py; checkpointing and chunks: tests/test_memory_options.py."""

import pytest
import torch
import torch.nn.functional as F

from megabyte import MegaByte
from megabyte.bits import byte_bits, strided_bits
from megabyte.model import output_logits
from tests.conftest import tiny_megabyte_config

P = 4  # patch size of the tiny MegaByte


def paper_logits(model: MegaByte, x: torch.Tensor) -> torch.Tensor:
    """Steps 1-7 of the paper written out, every patch alone (no cross-patch attention): x (B, K*P) ->
    logits (B, K*P, 256)."""
    B, T = x.shape
    K, d_global = T // P, model.config.d_global
    h = model.global_embedding(x) + model.global_pos_embedding(torch.arange(T))  # (B, T, D_G)
    h = torch.cat([model.global_pad.expand(B, 1, d_global), h.view(B, K, d_global)[:, :-1]], dim=1)  # (B, K, d_global)
    h = model.global_to_local(model.global_model(h).view(B * K, P, d_global // P))  # (B*K, P, d_local)
    prev = model.local_embedding(x.view(B * K, P)[:, :-1])  # (B*K, P-1, d_local)
    prev = torch.cat([model.local_pad.expand(B * K, 1, -1), prev], dim=1)  # (B*K, P, d_local)
    h = model.local_model(h + prev + model.local_pos_embedding.weight[:P])  # (B*K, P, d_local)
    return output_logits(h, model.local_embedding, model.lm_head).view(B, T, 256)


def test_without_cross_patch_bytes_the_model_is_the_papers_bit_for_bit():
    torch.manual_seed(0)
    model = MegaByte(tiny_megabyte_config(init_std=0.3)).eval()
    assert model.config.cross_patch_bytes == 0 and model.local_pos_embedding.weight.shape == (P, 16)
    x = torch.randint(0, 256, (2, 24))
    assert torch.equal(model(x), paper_logits(model, x))


@pytest.mark.parametrize("r", [1, 2, P])
def test_changing_a_byte_changes_no_logit_at_or_before_it(r):
    """Byte j changed: logits at positions <= j exactly the same, the next one not, for every j (each
    side of every patch boundary); a shorter sequence (internal padding) gives the same logits."""
    torch.manual_seed(0)
    model = MegaByte(tiny_megabyte_config(init_std=0.3, cross_patch_bytes=r)).eval()
    x = torch.randint(0, 256, (2, 14))  # 4 patches, the last one padded
    logits = model(x)
    for j in range(x.shape[1]):
        changed = x.clone()
        changed[:, j] = (changed[:, j] + 1) % 256
        new_logits = model(changed)
        assert torch.equal(new_logits[:, : j + 1], logits[:, : j + 1]), f"logits up to {j} changed"
        if j + 1 < x.shape[1]:
            assert not torch.allclose(new_logits[:, j + 1], logits[:, j + 1]), f"logit {j + 1} did not change"
    for T in (1, 5, 9):
        torch.testing.assert_close(model(x[:, :T]), logits[:, :T], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [0, 2])
def test_the_first_byte_of_a_patch_reads_the_previous_patchs_last_byte_locally(r):
    """With the global model's context made constant (w_GL zero), the local model alone predicts: without
    cross-patch attention the first byte of every patch sees only the pad, with it the bytes before."""
    torch.manual_seed(0)
    model = MegaByte(tiny_megabyte_config(init_std=0.3, cross_patch_bytes=r)).eval()
    torch.nn.init.zeros_(model.global_to_local.weight)
    x = torch.randint(0, 256, (1, 16))
    first = model(x)[0, P::P]  # (3, 256): the first byte of patches 1..3
    same = [torch.equal(first[0], first[k]) for k in (1, 2)]
    assert same == ([True, True] if r == 0 else [False, False])


def test_window_positions_have_their_own_embedding_and_the_option_is_checked():
    model = MegaByte(tiny_megabyte_config(cross_patch_bytes=3))
    assert model.local_pos_embedding.weight.shape == (3 + P, 16)
    for r in (-1, P + 1, True):
        with pytest.raises(ValueError, match=rf"cross_patch_bytes must be an integer in 0..patch_size \(4\), got {r!r}"):
            tiny_megabyte_config(cross_patch_bytes=r)


def test_every_short_attention_backend_computes_the_same_windows():
    """"packed" attends windows of r + P = 6 side by side, "written-out" one by one (the Triton kernel:
    tests/short_attention_interpreted.py): the same logits and gradients."""
    torch.manual_seed(0)
    config = tiny_megabyte_config(cross_patch_bytes=2)
    models = {backend: MegaByte(config, short_attention=backend).double() for backend in ("written-out", "packed")}
    models["packed"].load_state_dict(models["written-out"].state_dict())
    x = torch.randint(0, 256, (2, 40))
    results = {}
    for backend, model in models.items():
        logits = model(x)
        results[backend] = logits, torch.autograd.grad(byte_bits(logits, x).mean(), list(model.parameters()))
    torch.testing.assert_close(results["packed"][0], results["written-out"][0])
    for grad, reference in zip(results["packed"][1], results["written-out"][1]):
        torch.testing.assert_close(grad, reference)


def test_strided_inference_takes_each_byte_from_the_pass_that_sees_it_early_in_its_patch():
    torch.manual_seed(0)
    model = MegaByte(tiny_megabyte_config(init_std=0.3, cross_patch_bytes=2)).eval()
    x = torch.randint(0, 256, (2, 16))
    bits_of = lambda x: byte_bits(model(x), x)  # noqa: E731
    strided = strided_bits(bits_of, x, P)
    first, second = bits_of(x), bits_of(F.pad(x[:, 2:], (0, 2)))  # the second pass starts P / 2 = 2 bytes in
    for t in range(16):
        expected = first[:, t] if t % P < 2 else second[:, t - 2]
        torch.testing.assert_close(strided[:, t], expected, rtol=0, atol=0)
