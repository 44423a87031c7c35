"""The local model's attention alone (many short causal sequences), forward and backward: the Triton
kernel (``megabyte/kernels/short_attention.py``) at several tile sizes against SDPA over packed sequences (the
path taken with attention dropout) and the written-out matmuls (the CPU path). Each variant maps the
fused projection's output qkv (N, L, 3d) to (N, L, d); its error against float64 is printed beside
its time (on a GPU, of its kernels) and its rate over the fewest bytes the forward and
backward must move.

    python benchmarks/short_attention_speed.py [--N 8192] [--L 8] [--heads 6] [--head_dim 64] [--json FILE]

Defaults: config M's local model (8 sequences of 8,192 bytes, P = 8, 6 heads of 64). On the CPU it
runs only under Triton's interpreter (``TRITON_INTERPRET=1``, tiny sizes): CI keeps it working.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from megabyte.attention import block_causal_mask, sequences_per_pack, written_out_attention
from megabyte.kernels.short_attention import short_causal_attention
from profile_step import time_by_kind


def heads(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, l, 3d) -> q, k, v (n, nh, l, hs)."""
    n, l, three_d = qkv.shape
    return (t.view(n, l, n_heads, -1).transpose(1, 2) for t in qkv.split(three_d // 3, dim=-1))


def written_out(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    N, L, three_d = qkv.shape
    mask = torch.ones(L, L, dtype=torch.bool, device=qkv.device).tril()
    return written_out_attention(*heads(qkv, n_heads), mask).transpose(1, 2).reshape(N, L, three_d // 3)


def sdpa_packed(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    N, L, three_d = qkv.shape
    G = sequences_per_pack(N, L)
    q, k, v = heads(qkv.reshape(N // G, G * L, three_d), n_heads)  # (N/G, nh, G*L, hs)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(G, L, qkv.device))
    return y.transpose(1, 2).reshape(N, L, three_d // 3)


def seconds_per_call(fn, device: torch.device, reps: int) -> float:
    """Time of one call of ``fn``. On a GPU, the summed time of its kernels (torch.profiler, mean over
    ``reps`` calls): what the training step's CUDA graphs pay, without the host's launch and autograd
    costs, which for calls this short exceed the kernels' time. On the CPU, the median wall time."""
    fn()  # warm-up: kernel compilation, cuDNN plans
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        return sum(time_by_kind(prof, reps).values()) / 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--N", type=int, default=8192, help="sequences")
    parser.add_argument("--L", type=int, default=8, help="positions per sequence (the patch size)")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiles", default="32,64,128", help="tile sizes of the Triton kernel to try")
    parser.add_argument("--warps", default="4,8", help="warps per program of the Triton kernel to try")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="also time each variant under torch.compile")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    N, L, nh, hs = args.N, args.L, args.heads, args.head_dim
    d = nh * hs

    variants = {"written-out": written_out, "SDPA packed": sdpa_packed}
    for tile in map(int, args.tiles.split(",")):
        for warps in map(int, args.warps.split(",")):
            if tile >= L:
                variants[f"Triton tile {tile} warps {warps}"] = (
                    lambda qkv, n, tile=tile, warps=warps: short_causal_attention(qkv, n, tile, warps)
                )
    if args.compile:
        for name in list(variants):
            if name in ("SDPA packed",) or name.startswith("Triton tile 128 warps 8"):
                variants[f"{name}, compiled"] = torch.compile(variants[name], fullgraph=True, dynamic=False)

    # Fewest bytes: forward reads q, k, v and writes the output; backward reads q, k, v, the output and
    # its gradient and writes the gradients of q, k, v.
    floor_bytes = 12 * N * L * d * dtype.itemsize
    qkv = torch.randn(N, L, 3 * d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(N, L, d, device=device, dtype=dtype)
    reference_qkv = qkv.detach().double().requires_grad_()
    reference = written_out(reference_qkv, nh)
    (reference_grad,) = torch.autograd.grad(reference, reference_qkv, grad.double())

    rows = []
    for name, fn in variants.items():
        y = fn(qkv, nh)
        (g,) = torch.autograd.grad(y, qkv, grad)
        forward = seconds_per_call(lambda: fn(qkv, nh), device, args.reps)
        both = seconds_per_call(lambda: torch.autograd.grad(fn(qkv, nh), qkv, grad), device, args.reps)
        rows.append({
            "variant": name, "forward_ms": forward * 1e3, "forward_backward_ms": both * 1e3,
            "GB_per_s": floor_bytes / both / 1e9, "error_out": relative_error(y, reference),
            "error_grad": relative_error(g, reference_grad),
        })
    print(f"N {N}, L {L}, {nh} heads of {hs}, {args.dtype}, {device}; fewest bytes forward + backward {floor_bytes / 1e6:.0f} MB")
    print("| variant | forward ms | forward + backward ms | GB/s of the fewest bytes | error out | error grad |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | {r['GB_per_s']:,.0f} "
              f"| {r['error_out']:.1e} | {r['error_grad']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"N": N, "L": L, "heads": nh, "head_dim": hs, "dtype": args.dtype, "device": str(device),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
