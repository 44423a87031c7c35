import math

import pytest
import torch
import torch.nn.functional as F

from megabyte import ByteTransformer, ByteTransformerConfig, MegaByte, MegaByteConfig
from megabyte.bits import byte_bits
from megabyte.transformer import Block
from tests.conftest import tiny_megabyte_config, tiny_transformer_config

P = 4  # patch size of the tiny MegaByte


@pytest.mark.parametrize("T", [5, 16, 37, 64])
def test_causality(tiny_model, T):
    """Changing byte t leaves logits[:, :t+1] exactly unchanged and changes later logits."""
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, T))
    logits = tiny_model(x)
    # t at a patch start, inside a patch, at a patch end, and the last byte
    for t in sorted({0, P, P + 1, 2 * P - 1, T // 2, T - 1} & set(range(T))):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % 256
        new_logits = tiny_model(changed)
        assert torch.equal(new_logits[:, : t + 1], logits[:, : t + 1]), f"logits up to {t} changed"
        if t < T - 1:
            assert not torch.allclose(new_logits[:, t + 1 :], logits[:, t + 1 :]), f"no logit after {t} changed"


@pytest.mark.parametrize("T", [1, P, 7, 64])
def test_output_shape(tiny_model, T):
    x = torch.randint(0, 256, (3, T))
    assert tiny_model(x).shape == (3, T, 256)


def test_padding_does_not_change_real_positions():
    """A sequence whose length is not a multiple of P gives the logits of the same bytes in a
    longer sequence: the internal padding never leaks into real positions."""
    torch.manual_seed(0)
    model = MegaByte(tiny_megabyte_config()).eval()
    x = torch.randint(0, 256, (2, 64))
    full = model(x)
    for T in (1, 3, 5, 13, 63):
        torch.testing.assert_close(model(x[:, :T]), full[:, :T], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [0, 65])
def test_rejects_lengths_outside_range(tiny_model, T):
    with pytest.raises(ValueError, match="outside 1..max_seq_len"):
        tiny_model(torch.zeros(1, T, dtype=torch.long))


def test_rejects_non_long_input(tiny_model):
    with pytest.raises(TypeError, match="torch.long"):
        tiny_model(torch.zeros(1, 8, dtype=torch.uint8))


def test_initial_loss_is_near_uniform(tiny_model):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 64))
    loss = F.cross_entropy(tiny_model(x).reshape(-1, 256), x.reshape(-1))
    assert abs(loss.item() - math.log(256)) < 0.1


def test_paper_scale_init_loss_is_near_uniform():
    """With the paper's init std 0.006 a deeper, wider model still starts at about ln 256."""
    torch.manual_seed(0)
    config = MegaByteConfig(max_seq_len=256, patch_size=8, d_global=256, n_global_layers=4, n_global_heads=4,
                            d_local=128, n_local_layers=2, n_local_heads=4)  # fmt: skip
    x = torch.randint(0, 256, (2, 256))
    loss = F.cross_entropy(MegaByte(config).eval()(x).reshape(-1, 256), x.reshape(-1))
    assert abs(loss.item() - math.log(256)) < 0.1


@pytest.mark.parametrize("arch", ["megabyte", "transformer"])
def test_overfits_one_batch(arch):
    torch.manual_seed(0)
    if arch == "megabyte":
        model = MegaByte(tiny_megabyte_config(max_seq_len=32))
    else:
        model = ByteTransformer(tiny_transformer_config(max_seq_len=32))
    x = torch.randint(0, 256, (2, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = byte_bits(model(x), x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # 8 bits per byte at the start; a memorised batch costs a small fraction of a bit
    assert loss.item() < 0.5


def test_paper_components_are_trainable_parameters():
    model = MegaByte(tiny_megabyte_config())
    names = {name for name, _ in model.named_parameters()}
    for expected in ("global_embedding.weight", "global_pos_embedding.weight", "global_pad", "global_to_local.weight",
                     "local_embedding.weight", "local_pad", "local_pos_embedding.weight"):  # fmt: skip
        assert expected in names
    # E_global is (V, D_G) with D_G = d_global / P; positions are per byte, T x D_G
    assert model.global_embedding.weight.shape == (256, 32 // P)
    assert model.global_pos_embedding.weight.shape == (64, 32 // P)
    assert model.global_to_local.weight.shape == (16, 32 // P)
    assert model.lm_head is None  # tied to E_local


def test_untied_output_projection():
    model = MegaByte(tiny_megabyte_config(tie_embeddings=False))
    assert model.lm_head.weight.shape == (256, 16)
    assert model.lm_head.weight.data_ptr() != model.local_embedding.weight.data_ptr()
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 256)


def test_truncated_normal_init():
    std = 0.02
    model = MegaByte(tiny_megabyte_config(d_global=256, d_local=128, init_std=std))
    weight = model.global_model.blocks[0].attn.qkv.weight
    assert weight.abs().max() <= 2 * std
    assert abs(weight.std().item() - std * 0.88) < 0.1 * std  # std of N(0, s) truncated at 2s is 0.88 s
    assert torch.all(model.global_model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.global_model.norm.weight == 1)
    assert model.global_pad.abs().max() <= 2 * std


def test_first_byte_prediction_depends_only_on_pads():
    """logits[:, 0] has no context: it is the same for every input."""
    torch.manual_seed(0)
    model = MegaByte(tiny_megabyte_config()).eval()
    a, b = model(torch.randint(0, 256, (1, 16))), model(torch.randint(0, 256, (1, 16)))
    assert torch.equal(a[:, 0], b[:, 0])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_seq_len": 1001, "patch_size": 8}, r"max_seq_len 1001 is not a multiple of patch_size 8 .*: use max_seq_len 1000 or 1008"),
        ({"d_global": 36, "patch_size": 8, "max_seq_len": 64}, "d_global 36 is not a multiple of patch_size 8"),
        ({"d_global": 48, "n_global_heads": 5}, "d_global 48 is not a multiple of n_global_heads 5: use d_global 45 or 50"),
        ({"d_local": 18, "n_local_heads": 4}, "d_local 18 is not a multiple of n_local_heads 4: use d_local 16 or 20"),
        ({"n_local_layers": 0}, "n_local_layers must be a positive integer, got 0"),
        ({"dropout": -0.1}, "dropout must be in"),
        ({"init_std": 0.0}, "init_std must be positive"),
    ],
)
def test_megabyte_config_errors_name_the_option(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_megabyte_config(**overrides)


def test_transformer_config_errors_name_the_option():
    with pytest.raises(ValueError, match="d_model 30 is not a multiple of n_heads 4: use d_model 28 or 32"):
        ByteTransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        ByteTransformerConfig(n_layers=0)


def test_both_models_compile_to_one_graph_without_breaks(tiny_model):
    """torch.compile(fullgraph=True) is what MegaByteLM applies on the GPU: a graph break would fail it."""
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randint(0, 256, (2, 24))
    explanation = torch._dynamo.explain(tiny_model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(tiny_model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), tiny_model(x))


@pytest.mark.parametrize("arch", ["megabyte", "transformer"])
@pytest.mark.parametrize("autocast_residual", [True, False])
def test_residual_stream_dtype_under_autocast(arch, autocast_residual):
    """Under bf16 autocast every block reads and returns a bf16 residual stream by default, float32 with
    autocast_residual false; the logits agree to bf16 precision, and the model still compiles to one graph."""
    import torch._dynamo

    torch.manual_seed(0)
    make = {"megabyte": lambda: MegaByte(tiny_megabyte_config(autocast_residual=autocast_residual)),
            "transformer": lambda: ByteTransformer(tiny_transformer_config(autocast_residual=autocast_residual))}
    model = make[arch]().eval()
    dtypes = []
    for block in (m for m in model.modules() if isinstance(m, Block)):
        block.register_forward_hook(lambda module, args, out: dtypes.append((args[0].dtype, out.dtype)))
    x = torch.randint(0, 256, (2, 24))
    reference = model(x)
    assert {d for pair in dtypes for d in pair} == {torch.float32}  # no autocast: float32 throughout
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(x)
    expected = torch.bfloat16 if autocast_residual else torch.float32
    assert dtypes and {d for pair in dtypes for d in pair} == {expected}
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)
