"""The analytic FLOPs per byte equal FlopCounterMode's count of a training step; the throughput
callback logs bytes/s and the FLOP count to TensorBoard."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from callbacks.throughput import ThroughputCallback
from datamodules import TextDataModule
from megabyte import ByteTransformerConfig, MegaByteConfig, MegaByteLM
from megabyte.flops import forward_flops_per_byte, training_flops_per_byte
from megabyte.bits import byte_bits
from megabyte.model import build_model
from tests.conftest import tiny_megabyte_config, tiny_transformer_config

CONFIGS = {
    "megabyte": tiny_megabyte_config(),  # K = 16 patches: both models use written-out attention
    "megabyte-long": tiny_megabyte_config(max_seq_len=256),  # K = 64: the global model uses SDPA
    "megabyte-untied-ffn2": tiny_megabyte_config(patch_size=8, d_global=64, tie_embeddings=False, ffn_ratio=2),
    "megabyte-cross-patch": tiny_megabyte_config(cross_patch_bytes=3),  # local windows of 3 + 4 positions
    "transformer": tiny_transformer_config(),
}


def counted_training_flops(config, B: int, T: int, backend: SDPBackend) -> int:
    model = build_model(config)
    x = torch.randint(0, 256, (B, T))
    with sdpa_kernel(backend), FlopCounterMode(display=False) as counter:
        byte_bits(model(x), x).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_analytic_flops_equal_flop_counter_mode(name):
    config, B = CONFIGS[name], 2
    T = config.max_seq_len
    flops = forward_flops_per_byte(config, T)
    # The CPU's fused attention kernel is not counted by FlopCounterMode; written-out attention is.
    counted = counted_training_flops(config, B, T, SDPBackend.FLASH_ATTENTION)
    assert counted == 3 * (flops.linear + flops.short_attention) * B * T
    # The math kernel is counted as batched matmuls: forward once, backward twice.
    counted = counted_training_flops(config, B, T, SDPBackend.MATH)
    assert counted == 3 * (flops.linear + flops.attention + flops.short_attention) * B * T
    # On a GPU, flash attention's backward also recomputes the scores: 3.5x the forward.
    assert training_flops_per_byte(config, T) == 3 * (flops.linear + flops.short_attention) + 3.5 * flops.attention


def test_the_issue_figures_for_config_m():
    """The speed issue's counts, and FlopCounterMode's on an H100 (benchmarks/RESULTS.md): 144.95 M and
    1,567.75 M FLOPs per byte."""
    m = MegaByteConfig(max_seq_len=8192, patch_size=8, d_global=768, n_global_layers=12, n_global_heads=12,
                       d_local=384, n_local_layers=6, n_local_heads=6)  # fmt: skip
    byte_transformer = ByteTransformerConfig(max_seq_len=8192, d_model=768, n_layers=12, n_heads=12)
    assert round(training_flops_per_byte(m, 8192) / 1e4) == 14495
    assert round(training_flops_per_byte(byte_transformer, 8192) / 1e4) == 156775


def test_throughput_callback_logs_bytes_per_second(text_file, tmp_path):
    datamodule = TextDataModule(str(text_file), seq_len=32, batch_size=2, num_workers=0, cache_dir=str(tmp_path))
    model = MegaByteLM(tiny_megabyte_config(max_seq_len=32), warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6, limit_val_batches=0, logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[ThroughputCallback(log_every_n_batches=2, peak_flops_per_device=1e12)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule)
    accumulator = EventAccumulator(str(tmp_path / "run" / "version_0"))
    accumulator.Reload()
    rates = [e.value for e in accumulator.Scalars("throughput/bytes_per_sec")]
    assert [e.step for e in accumulator.Scalars("throughput/bytes_per_sec")] == [2, 4, 6]
    assert all(r > 0 for r in rates)
    flops_per_byte = accumulator.Scalars("throughput/flops_per_byte")[0].value
    assert flops_per_byte == pytest.approx(training_flops_per_byte(model.config, 32))
    mfu = [e.value for e in accumulator.Scalars("throughput/mfu")]
    assert mfu == pytest.approx([r * flops_per_byte / 1e12 for r in rates], rel=1e-5)


def test_throughput_callback_rejects_a_bad_window():
    with pytest.raises(ValueError, match="log_every_n_batches must be a positive integer"):
        ThroughputCallback(log_every_n_batches=0)
