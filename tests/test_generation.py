"""Key/value-cached generation gives what a full forward recomputation gives, for both architectures."""

import copy

import pytest
import torch

from megabyte import ByteTransformer, MegaByte
from megabyte.generation import generate, sample_next_byte
from megabyte.transformer import KVCache, Transformer
from tests.conftest import tiny_megabyte_config, tiny_transformer_config

# init_std 0.3 spreads the logits far apart, so greedy choices never hang on a rounding tie.
MODELS = {
    "megabyte": lambda: MegaByte(tiny_megabyte_config(init_std=0.3)),
    # the local model also attends to the last 2 bytes of the previous patch: a new patch's step reads them
    "megabyte-cross-patch": lambda: MegaByte(tiny_megabyte_config(init_std=0.3, cross_patch_bytes=2)),
    "transformer": lambda: ByteTransformer(tiny_transformer_config(init_std=0.3)),
}


@pytest.fixture(params=sorted(MODELS))
def model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


def greedy_by_recomputation(model: torch.nn.Module, prompt: torch.Tensor, total: int) -> torch.Tensor:
    """Greedy decoding the slow way: a full forward over the whole sequence for every new byte."""
    x = prompt
    while x.shape[1] < total:
        logits = model(torch.cat([x, x.new_zeros(len(x), 1)], dim=1))[:, -1]  # prediction of the next byte
        x = torch.cat([x, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return x


# patch_size is 4: prompts that are empty, end on a patch boundary (4, 8) and inside a patch (1, 6, 13)
@pytest.mark.parametrize("n", [0, 1, 4, 6, 8, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_cached_generation_equals_recomputation(model, n, dtype):
    model = model.to(dtype)
    prompt = torch.randint(0, 256, (3, n), generator=torch.Generator().manual_seed(n))
    total = model.config.max_seq_len  # 64: the whole context, across many patches
    cached = generate(model, prompt, total - n, temperature=0)
    assert cached.shape == (3, total) and torch.equal(cached[:, :n], prompt)
    assert torch.equal(cached, greedy_by_recomputation(model, prompt, total))


@pytest.mark.parametrize("narrow", [False, True], ids=["whole-cache", "narrowed"])
@pytest.mark.parametrize("n", [0, 3, 4, 9])
def test_cached_logits_match_the_full_forward(model, n, narrow):
    """Teacher-forced decoding steps give the full forward's logits, attending over the whole buffers
    (a caller that never narrows) or over the window ``narrow_attention`` picks before every step."""
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = model(x)  # (2, 40, 256)
    with torch.no_grad():
        logits, state = model.prefill(x[:, :n])
        torch.testing.assert_close(logits, reference[:, n], atol=1e-5, rtol=1e-5)
        for t in range(n + 1, 40):
            if narrow:
                model.narrow_attention(state, t)
            logits = model.decode_step(x[:, t - 1], model.step_kind(t), state)
            torch.testing.assert_close(logits, reference[:, t], atol=1e-5, rtol=1e-5)


def keys_read(monkeypatch, max_len: int) -> list[int]:
    """From now on, record the number of cached keys each decoding forward through a cache of
    ``max_len`` positions attends over (S)."""
    seen = []
    append = KVCache.append

    def spy(self, layer, k, v):
        keys, values, bias = append(self, layer, k, v)
        if bias is not None and layer == 0 and self.max_len == max_len:
            seen.append(keys.shape[2])
        return keys, values, bias

    monkeypatch.setattr(KVCache, "append", spy)
    return seen


# prompts crossing the caches' windows: the ByteTransformer's (64 positions) at 2, 4, 8, 16, 24, ...,
# MegaByte's global one (16 patches) at 2, 4, 6, ... patches
@pytest.mark.parametrize("n", [0, 7, 8, 23, 30])
def test_decoding_over_windows_gives_the_bytes_of_decoding_over_the_whole_cache(model, n, monkeypatch):
    prompt = torch.randint(0, 256, (3, n), generator=torch.Generator().manual_seed(n))
    new = model.config.max_seq_len - n
    max_len = model.config.max_seq_len // getattr(model.config, "patch_size", 1)  # the growing cache's
    seen = keys_read(monkeypatch, max_len)
    for temperature in (0.0, 1.0):
        full = generate(model, prompt, new, temperature, generator=torch.Generator().manual_seed(2), full_cache=True)
        assert set(seen) == {max_len}
        seen.clear()
        windowed = generate(model, prompt, new, temperature, generator=torch.Generator().manual_seed(2))
        assert torch.equal(windowed, full)
        # each step reads no more than the next window up from the positions it needs
        needed = range(n + 2, model.config.max_seq_len + 1)  # the ByteTransformer's steps: t + 1 positions
        if isinstance(model, MegaByte):  # a new patch's step: t / P + 1 global positions
            P = model.config.patch_size
            needed = [t // P + 1 for t in range(n + 1, model.config.max_seq_len) if t % P == 0]
        assert len(seen) == len(needed) and all(m <= s <= max(2 * m, 8) for m, s in zip(needed, seen))
        seen.clear()


def test_a_cache_narrows_to_few_windows_and_only_after_its_prefill():
    cache = KVCache(n_layers=1, max_len=8192)
    assert cache.windows == (256, 512, *range(1024, 8193, 1024))
    assert KVCache(1, 64).windows == (2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert KVCache(1, 3).windows == (2, 3)
    with pytest.raises(ValueError, match="narrow a KVCache after its first forward"):
        cache.narrow(5)
    transformer = Transformer(d_model=16, n_layers=1, n_heads=2, d_hidden=32, dropout=0.0).eval()
    cache = transformer.new_cache(64)
    with torch.no_grad():
        transformer(torch.randn(2, 5, 16), cache)
    assert [cache.narrow(m) for m in (1, 6, 17, 64)] == [2, 8, 24, 64]
    assert cache.narrow(None) is None and cache.window is None
    with pytest.raises(ValueError, match="KVCache holds 64 positions; cannot attend over 65"):
        cache.narrow(65)


def test_transformer_fed_in_chunks_through_its_cache_equals_one_pass():
    torch.manual_seed(0)
    transformer = Transformer(d_model=16, n_layers=2, n_heads=2, d_hidden=32, dropout=0.0).eval()
    h = torch.randn(2, 11, 16)
    cache = transformer.new_cache(11)
    with torch.no_grad():
        chunks = [transformer(h[:, a:b], cache) for a, b in ((0, 3), (3, 4), (4, 9), (9, 11))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), transformer(h), atol=1e-6, rtol=1e-5)
    assert int(cache.length) == 11
    cache.reset()
    torch.testing.assert_close(transformer(h[:, 4:9], cache), transformer(h[:, 4:9]), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="KVCache holds 11 positions"):
        transformer(torch.randn(2, 12, 16), transformer.new_cache(11))


def test_sampling_is_reproducible_and_restricted(model):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    a = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    greedy = generate(model, prompt, 20, temperature=0)
    assert torch.equal(generate(model, prompt, 20, top_k=1, generator=torch.Generator().manual_seed(3)), greedy)
    assert torch.equal(generate(model, prompt, 20, top_p=1e-6, generator=torch.Generator().manual_seed(3)), greedy)
    assert 0 <= int(a.min()) and int(a.max()) <= 255


def test_sample_next_byte_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [0.0] * 253])).expand(20_000, 256)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next_byte(logits, generator=generator), minlength=256).float() / 20_000
    torch.testing.assert_close(counts[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.015, rtol=0)
    top2 = torch.bincount(sample_next_byte(logits, top_k=2, generator=generator), minlength=256).float() / 20_000
    torch.testing.assert_close(top2[:3], torch.tensor([0.625, 0.375, 0.0]), atol=0.015, rtol=0)
    # top_p 0.6: bytes 0 and 1 (0.5 alone does not reach 0.6), renormalised
    nucleus = torch.bincount(sample_next_byte(logits, top_p=0.6, generator=generator), minlength=256).float() / 20_000
    torch.testing.assert_close(nucleus[:3], torch.tensor([0.625, 0.375, 0.0]), atol=0.015, rtol=0)
    # a low temperature sharpens: p ~ p^(1/T), T = 0.5 -> 0.25 : 0.09 : 0.04
    cold = torch.bincount(sample_next_byte(logits, temperature=0.5, generator=generator), minlength=256).float()
    torch.testing.assert_close(cold[:3] / 20_000, torch.tensor([25, 9, 4]) / 38, atol=0.015, rtol=0)


def test_generate_keeps_training_mode_and_checks_its_arguments():
    torch.manual_seed(0)
    model = MegaByte(tiny_megabyte_config(dropout=0.5)).train()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    # dropout is off while generating: greedy decoding is deterministic
    assert torch.equal(generate(model, prompt, 10, temperature=0), generate(model, prompt, 10, temperature=0))
    assert model.training
    assert torch.equal(generate(model, prompt, 0), prompt)
    with pytest.raises(ValueError, match="exceeds max_seq_len 64"):
        generate(model, prompt, 62)
    for temperature in (-1, float("nan")):
        with pytest.raises(ValueError, match="temperature must be >= 0"):
            generate(model, prompt, 4, temperature=temperature)
    with pytest.raises(ValueError, match="top_k must be in 1..256"):
        generate(model, prompt, 4, top_k=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, prompt, 4, top_p=1.5)
    with pytest.raises(ValueError, match="expected prompt LongTensor"):
        generate(model, prompt.to(torch.uint8), 4)
    for byte in (-1, 256):
        with pytest.raises(ValueError, match=f"prompt bytes must be in 0..255, got {min(byte, 0)}..{max(byte, 0)}"):
            generate(model, torch.tensor([[0, byte]]), 4)


def test_compiled_decoding_steps_give_the_same_bytes(model):
    """generate(compile=True) fuses each kind of step with torch.compile (inductor, here on the CPU);
    the caches are written in place, so the bytes equal the uncompiled decoding's."""
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    greedy = generate(model, prompt, 30, temperature=0)
    assert torch.equal(generate(model, prompt, 30, temperature=0, compile=True), greedy)
    sampled = generate(model, prompt, 30, generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate(model, prompt, 30, generator=torch.Generator().manual_seed(4), compile=True), sampled)
    # The compilations serve every later call of the same batch size and sampling: other lengths of
    # prompt and of generation, cache windows not reached before (40, 48), another copy of the model,
    # compile nothing new.
    from torch._dynamo.utils import counters

    compiled = counters["stats"]["unique_graphs"]
    prompt = prompt[:, :3]
    again = generate(copy.deepcopy(model), prompt, 41, generator=torch.Generator().manual_seed(5), compile=True)
    assert counters["stats"]["unique_graphs"] == compiled
    assert torch.equal(again, generate(model, prompt, 41, generator=torch.Generator().manual_seed(5)))


def test_under_autocast_a_copy_in_its_dtype_decodes(model, monkeypatch):
    """bf16 autocast: a bf16 copy decodes with autocast off (no weight casts at every step), giving the
    bytes of the model cast to bf16; the model itself is untouched."""
    seen = []
    decode_step = type(model).decode_step

    def spy(self, *args):
        seen.append((next(self.parameters()).dtype, torch.is_autocast_enabled("cpu")))
        return decode_step(self, *args)

    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(type(model), "decode_step", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = generate(model, prompt, 20, generator=torch.Generator().manual_seed(1))
    assert set(seen) == {(torch.bfloat16, False)}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    half = type(model)(model.config).eval()
    half.load_state_dict(model.state_dict())
    expected = generate(half.to(torch.bfloat16), prompt, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mixed, expected)
