import copy
import math

import lightning as L
import pytest
import torch
import torch.nn as nn

from datamodules import TextDataModule
from megabyte import MegaByteConfig, MegaByteLM
from megabyte.kernels.inductor_passes import FuseReluBackwardIntoMatmul, FuseReluIntoAddmm, ProductsInFloat32
from megabyte.bits import byte_bits, strided_bits
from megabyte.optim import lr_factor, parameter_groups
from tests.conftest import tiny_megabyte_config, tiny_transformer_config


def test_byte_bits_hand_computed():
    """Uniform logits cost exactly 8 bits; a logit of ln 255 on one byte gives it p = 1/2 (1 bit)
    and every other byte p = 1/510."""
    x = torch.tensor([[97, 98]])
    logits = torch.zeros(1, 2, 256)
    assert torch.allclose(byte_bits(logits, x), torch.tensor([[8.0, 8.0]]))
    logits[:, :, 97] = math.log(255)
    expected = torch.tensor([[1.0, math.log2(510)]])
    assert torch.allclose(byte_bits(logits, x), expected)


class PrefersA(nn.Module):
    """Puts probability 1/2 on byte 'a' everywhere: 'a' costs 1 bit, any other byte log2(510)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, 256)
        logits[..., ord("a")] = math.log(255)
        return logits


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_eval_bpb_is_total_bits_over_total_bytes():
    """Exact over the split, padding excluded, not a mean of batch means."""
    lm = MegaByteLM(tiny_megabyte_config())
    lm.model = PrefersA()
    a, b = ord("a"), ord("b")
    batch1 = (torch.tensor([[a, a, a, a]], dtype=torch.uint8), torch.ones(1, 4, dtype=torch.bool))
    batch2 = (torch.tensor([[b, b, 0, 0]], dtype=torch.uint8), torch.tensor([[True, True, False, False]]))
    lm._eval_step(batch1, lm.val_bpb, "val/bpb")
    lm._eval_step(batch2, lm.val_bpb, "val/bpb")
    exact = (4 * 1.0 + 2 * math.log2(510)) / 6
    assert lm.val_bpb.compute().item() == pytest.approx(exact, rel=1e-6)  # float32 per-byte bits
    assert abs(exact - (1.0 + math.log2(510)) / 2) > 1  # what a mean of batch means would give


def test_validate_matches_a_manual_pass_over_the_split(text_file, tmp_path):
    torch.manual_seed(0)
    dm = TextDataModule(str(text_file), seq_len=64, batch_size=3, num_workers=0, cache_dir=str(tmp_path / "cache"))
    lm = MegaByteLM(tiny_megabyte_config())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (result,) = trainer.validate(lm, dm)
    val = dm.splits["val"]
    assert len(val) % 64 != 0 and len(val) // 64 % 3 != 0  # a short last window, a short last batch
    total_bits = 0.0
    lm.eval()
    with torch.no_grad():
        for start in range(0, len(val), 64):
            x = torch.from_numpy(val[start : start + 64].astype("int64"))[None]
            total_bits += byte_bits(lm.model(x), x).double().sum().item()
    assert result["val/bpb"] == pytest.approx(total_bits / len(val), rel=1e-6)


@pytest.mark.parametrize("P", [4, 3, 8])
def test_strided_bits_take_every_byte_from_the_pass_that_puts_it_early_in_its_patch(P):
    T = 12
    x = torch.randint(0, 256, (2, T))

    def bits_of(inp: torch.Tensor) -> torch.Tensor:  # a pass's bits: the byte plus 1000 x its place in its patch
        assert inp.shape == (2, T)  # both passes keep the shape (one compiled graph)
        return inp.float() + 1000 * (torch.arange(T) % P)

    place = torch.arange(T) % P
    half = P // 2
    place_read = torch.where(place >= half, place - half, place)  # the second pass sees x offset by P // 2
    assert (place_read < (P + 1) // 2).all()
    assert torch.equal(strided_bits(bits_of, x, P), x.float() + 1000 * place_read)


def test_strided_validation_is_exact_over_the_split(text_file, tmp_path):
    torch.manual_seed(0)
    dm = TextDataModule(str(text_file), seq_len=64, batch_size=3, num_workers=0, cache_dir=str(tmp_path / "cache"))
    lm = MegaByteLM(tiny_megabyte_config(), strided_eval=True)  # patch_size 4
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (strided,) = trainer.validate(lm, dm)
    lm.hparams.strided_eval = False
    (plain,) = trainer.validate(lm, dm)
    val = dm.splits["val"]
    assert len(val) % 64 != 0  # a short last window
    total_bits = 0.0
    lm.eval()
    with torch.no_grad():
        for start in range(0, len(val), 64):
            x = torch.from_numpy(val[start : start + 64].astype("int64"))[None]
            bits = byte_bits(lm.model(x), x)[0]
            later = x[:, 2:]  # the window without its first half patch
            bits_later = byte_bits(lm.model(later), later)[0]
            total_bits += sum(bits[t] if t % 4 < 2 else bits_later[t - 2] for t in range(x.shape[1])).item()
    assert strided["val/bpb"] == pytest.approx(total_bits / len(val), rel=1e-6)
    assert strided["val/bpb"] != pytest.approx(plain["val/bpb"], rel=1e-4)


def test_strided_eval_needs_patches():
    with pytest.raises(ValueError, match="strided_eval offsets MegaByte's patches; ByteTransformerConfig has none"):
        MegaByteLM(tiny_transformer_config(), strided_eval=True)


def test_parameter_groups_exclude_embeddings_norms_biases():
    lm = MegaByteLM(tiny_megabyte_config())
    decay, no_decay = parameter_groups(lm.model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in lm.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(not_decayed)
    assert decayed | not_decayed == set(names.values())
    assert all(n.endswith(".weight") for n in decayed)
    for name in ("global_embedding.weight", "global_pos_embedding.weight", "local_embedding.weight",
                 "local_pos_embedding.weight", "global_pad", "local_pad", "global_model.norm.weight",
                 "global_model.blocks.0.attn.qkv.bias"):  # fmt: skip
        assert name in not_decayed
    assert "global_model.blocks.0.attn.qkv.weight" in decayed
    assert "global_to_local.weight" in decayed


def test_learning_rate_schedule():
    factor = [lr_factor(s, warmup_steps=10, total_steps=110, schedule="linear", min_lr_ratio=0.0) for s in range(110)]
    assert factor[0] == pytest.approx(0.1) and factor[9] == pytest.approx(1.0)
    assert factor[10] == pytest.approx(1.0) and factor[60] == pytest.approx(0.5)
    assert lr_factor(110, 10, 110, "linear", 0.1) == pytest.approx(0.1)
    assert lr_factor(60, 10, 110, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, float("inf"), "linear", 0.0) == 1.0  # no known end: no decay
    assert lr_factor(100, 10, 110, "constant", 0.0) == 1.0


def test_optimizer_is_adamw_with_paper_betas(text_file, tmp_path):
    dm = TextDataModule(str(text_file), seq_len=32, batch_size=2, num_workers=0, cache_dir=str(tmp_path / "cache"))
    lm = MegaByteLM(tiny_megabyte_config(max_seq_len=32), lr=1e-3, warmup_steps=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(lm, dm)
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["betas"] == (0.9, 0.98) for group in optimizer.param_groups)
    # linear decay to 0 at max_steps: after 4 of 4 steps the learning rate is 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


@pytest.mark.parametrize("arch", ["megabyte", "transformer"])
def test_checkpoint_holds_plain_hparams_and_rebuilds_the_model(arch, text_file, tmp_path):
    config = tiny_megabyte_config(max_seq_len=32) if arch == "megabyte" else tiny_transformer_config(max_seq_len=32)
    dm = TextDataModule(str(text_file), seq_len=32, batch_size=2, num_workers=0, cache_dir=str(tmp_path / "cache"))
    lm = MegaByteLM(config, lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(lm, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # no pickled objects
    assert ckpt["hyper_parameters"]["arch"]["init_args"]["max_seq_len"] == 32
    restored = MegaByteLM.load_from_checkpoint(path)
    assert restored.config == config
    x = torch.randint(0, 256, (1, 32))
    lm.eval()
    restored.eval()
    assert torch.equal(restored(x), lm(x))


def test_rejects_bad_optimizer_settings():
    with pytest.raises(ValueError, match="lr > 0"):
        MegaByteLM(MegaByteConfig(), lr=0.0)


def test_gradient_clipping_scales_the_total_norm_down_to_the_limit():
    torch.manual_seed(0)
    model = MegaByteLM(tiny_megabyte_config())
    x = torch.randint(0, 256, (2, 16))
    (byte_bits(model(x), x).mean() * 1000).backward()
    norm = lambda: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))  # noqa: E731
    assert norm() > 1.0
    model.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert norm().item() == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ValueError, match="only gradient_clip_algorithm 'norm'"):
        model.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="value")


def test_gradient_clipping_of_a_fused_adamw_is_the_optimizers_own_division():
    # The same gradients clipped by clip_grad_norm_ before a plain AdamW step, and divided inside the
    # fused AdamW's step: the same gradients and weights after the step. eps = 0.1 makes Adam's update
    # depend on the gradients' scale, so the weights tell too.
    torch.manual_seed(0)
    model = MegaByteLM(tiny_megabyte_config())
    x = torch.randint(0, 256, (2, 16))
    (byte_bits(model(x), x).mean() * 1000).backward()
    twin = copy.deepcopy(model)  # without the gradients
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    fused = torch.optim.AdamW(model.parameters(), lr=0.01, eps=0.1, fused=True)
    plain = torch.optim.AdamW(twin.parameters(), lr=0.01, eps=0.1, foreach=False)
    model.configure_gradient_clipping(fused, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    twin.configure_gradient_clipping(plain, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert fused.grad_scale.item() > 1.0 and not hasattr(plain, "grad_scale")
    fused.step()
    plain.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
        torch.testing.assert_close(p, q, msg=name)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize(
    "mode, expected",
    [
        (None, {"triton.cudagraphs": True}),
        ("default", {}),
        ("max-autotune", {"max_autotune": True, "triton.cudagraphs": True, "coordinate_descent_tuning": True}),
    ],
)
def test_compile_mode_reaches_torch_compile(monkeypatch, tmp_path, mode, expected):
    """compile_mode (default reduce-overhead: CUDA graphs) reaches torch.compile as the inductor options
    of that mode, with the ReLU passes, the float32 products and programmatic dependent launch added;
    "default" is torch.compile's own. The loss is compiled too. The compiled calls are replaced here: no
    compilation runs."""
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: ("compiled", fn, kwargs))
    lm = MegaByteLM(tiny_megabyte_config(max_seq_len=32), compile=True, **({} if mode is None else {"compile_mode": mode}))
    lm.trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    lm.configure_model()
    assert len(calls) == 1
    options = calls[0].pop("options")
    assert calls == [{"fullgraph": True, "dynamic": False}]
    joint = options.pop("joint_custom_post_pass")  # training graphs; the post-grad pass serves the others
    fuse, fuse_backward, float32_products = joint.passes
    assert isinstance(fuse, FuseReluIntoAddmm) and options.pop("post_grad_custom_pre_pass") is fuse
    assert isinstance(fuse_backward, FuseReluBackwardIntoMatmul) and fuse_backward.devices == ("cuda",)
    assert fuse_backward.dtypes == (torch.bfloat16, torch.float16)
    assert isinstance(float32_products, ProductsInFloat32) and float32_products.devices == ("cuda",)
    assert options.pop("triton.enable_pdl") is True
    assert options == expected
    assert lm._byte_bits == ("compiled", byte_bits, {"fullgraph": True, "dynamic": False})


@pytest.mark.parametrize("accumulate, mode, cuda_graphs", [(1, "reduce-overhead", True), (2, "default", False)])
def test_gradient_accumulation_compiles_without_cuda_graphs(monkeypatch, tmp_path, accumulate, mode, cuda_graphs):
    """With accumulate_grad_batches > 1, "reduce-overhead" becomes "default": a backward graph's replay would
    overwrite the gradients the previous micro-batch left in ``.grad`` (pytorch/pytorch#169545; it stopped
    DDP training with accumulation on an H100). No compilation runs here."""
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    lm = MegaByteLM(tiny_megabyte_config(max_seq_len=32), compile=True, compile_mode="reduce-overhead")
    lm.trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, accumulate_grad_batches=accumulate)
    lm.configure_model()
    (call,) = calls
    assert call["options"].get("triton.cudagraphs", False) is cuda_graphs
    assert {k: v for k, v in call["options"].items() if "pass" not in k and k != "triton.enable_pdl"} == (
        dict(torch._inductor.list_mode_options(mode)) if mode != "default" else {}
    )
    assert lm._cuda_graphs is cuda_graphs


def test_training_step_logs_nothing_to_the_progress_bar(text_file, tmp_path):
    """The progress bar's metrics are read on the host after every batch (a GPU synchronisation):
    training logs none; val/bpb, once per validation, is there."""
    dm = TextDataModule(str(text_file), seq_len=32, batch_size=2, num_workers=0, cache_dir=str(tmp_path / "cache"))
    lm = MegaByteLM(tiny_megabyte_config(max_seq_len=32))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=1, val_check_interval=2)  # fmt: skip
    trainer.fit(lm, dm)
    assert set(trainer.progress_bar_metrics) == {"val/bpb"}
    assert {"train/loss", "train/bpb"} <= set(trainer.callback_metrics)
