"""Runs ``megabyte/kernels/short_attention.py``'s Triton kernels on the CPU under Triton's interpreter and prints
what tests/test_short_attention.py checks, as JSON. Run as a script with TRITON_INTERPRET=1 in the
environment (the interpreter is chosen when the kernels are defined, at import)."""

import json
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from megabyte.model import MegaByte
from megabyte.kernels.short_attention import _forward, short_causal_attention
from tests.conftest import tiny_megabyte_config

# name -> (sequences N, length L, heads, head size, tile): ragged last tiles, tiles not filled by whole
# sequences (12 into 64), head sizes under 16 and not a power of two (padded), one-position sequences.
CASES = {
    "L8": (37, 8, 2, 16, 128),
    "L12 tile 64": (11, 12, 3, 8, 64),
    "L1": (5, 1, 1, 16, 16),
    "L32 head size 24": (9, 32, 2, 24, 32),
    "L16 tile 16": (7, 16, 2, 16, 16),
    "no sequences": (0, 8, 2, 16, 64),
}


def reference(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v of each sequence under a causal mask, spelled out: (N, L, 3d) -> (N, L, d)."""
    N, L, three_d = qkv.shape
    q, k, v = (t.reshape(N, L, n_heads, three_d // 3 // n_heads).transpose(1, 2) for t in qkv.split(three_d // 3, dim=-1))
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (N, nh, L, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return (weights @ v).transpose(1, 2).reshape(N, L, three_d // 3)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_against_reference(N: int, L: int, n_heads: int, hs: int, tile: int) -> dict:
    qkv = torch.randn(N, L, 3 * n_heads * hs, requires_grad=True)
    out = short_causal_attention(qkv, n_heads, tile=tile)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    qkv64 = qkv.detach().double().requires_grad_()
    expected = reference(qkv64, n_heads)
    (expected_grad,) = torch.autograd.grad(expected, qkv64, grad_out.double())
    if N == 0:
        return {"out": 0.0 if out.shape == expected.shape else 1.0, "grad": 0.0 if grad.shape == qkv.shape else 1.0,
                "finite": True}  # fmt: skip
    return {"out": relative_error(out, expected), "grad": relative_error(grad, expected_grad),
            "finite": bool(out.isfinite().all() and grad.isfinite().all())}  # fmt: skip


def compiled_against_eager() -> dict:
    """Through torch.compile (fullgraph, AOT autograd): the op's fake implementation and autograd
    registration let it trace; the numbers are the eager ones."""
    fn = lambda qkv: short_causal_attention(qkv, 2) * 2
    qkv = torch.randn(6, 8, 96, requires_grad=True)
    eager = fn(qkv)
    (eager_grad,) = torch.autograd.grad(eager.sum(), qkv)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(qkv)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), qkv)
    return {"out": torch.equal(eager, compiled), "grad": torch.equal(eager_grad, compiled_grad)}


def megabyte_with_kernel(cross_patch_bytes: int = 0) -> dict:
    """A MegaByte's local model attending through the kernel gives the logits and gradients of the
    written-out attention the CPU uses, and FlopCounterMode counts the same FLOPs for both (with
    cross-patch attention the kernel attends windows of cross_patch_bytes + 8 positions)."""
    torch.manual_seed(0)
    config = tiny_megabyte_config(patch_size=8, d_global=64, d_local=32, init_std=0.3, cross_patch_bytes=cross_patch_bytes)
    written_out = MegaByte(config, short_attention="written-out")
    kernel = MegaByte(config, short_attention="kernel")
    kernel.load_state_dict(written_out.state_dict())
    x = torch.randint(0, 256, (2, 64))
    results = []
    for model in (written_out, kernel):
        with FlopCounterMode(display=False) as counter:
            logits = model(x)
            logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()], counter.get_total_flops()))
    (logits, grads, flops), (kernel_logits, kernel_grads, kernel_flops) = results
    return {"logits": relative_error(kernel_logits, logits), "flops": [flops, kernel_flops],
            "grads": max(relative_error(g, e) for g, e in zip(kernel_grads, grads))}  # fmt: skip


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    opcheck = torch.library.opcheck(_forward, (torch.randn(5, 8, 96, requires_grad=True), 2, 128, 4))
    print(json.dumps({
        "cases": {name: kernel_against_reference(*case) for name, case in CASES.items()},
        "compiled": compiled_against_eager(),
        "megabyte": megabyte_with_kernel(),
        "megabyte-cross-patch": megabyte_with_kernel(cross_patch_bytes=4),
        "opcheck": {name: result == "SUCCESS" for name, result in opcheck.items()},
    }))  # fmt: skip
