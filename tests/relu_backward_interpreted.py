"""Runs ``megabyte/kernels/relu_backward.py``'s Triton kernel, and ``inductor_passes.FuseReluBackwardIntoMatmul`` that
puts it into compiled training graphs, on the CPU under Triton's interpreter and prints what
tests/test_relu_backward.py checks, as JSON. Run as a script with TRITON_INTERPRET=1 in the environment
(the interpreter is chosen when the kernel is defined, at import)."""

import json
import operator
import os

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.experimental.proxy_tensor import make_fx

from megabyte.kernels.inductor_passes import FuseReluBackwardIntoMatmul, FuseReluIntoAddmm, Passes
from megabyte.model import MegaByte
from megabyte.transformer import FeedForward
from megabyte.kernels.relu_backward import relu_backward_matmul, runs_kernel
from tests.conftest import tiny_megabyte_config

KERNEL = torch.ops.megabyte.relu_backward_matmul.default

# name -> (M, K, N, block_n, b transposed, the kernel runs): whole blocks, ragged edges in every
# dimension, K under a block, a weight read through a transposed view (as the backward graph passes it),
# no rows, one row; and widths whose rows TMA cannot copy (float32 rows of 70 or 3 values: not a multiple
# of 16 bytes) and an empty inner dimension, which take PyTorch's operations.
CASES = {
    "whole blocks": (256, 128, 256, 128, False, True),
    "ragged": (300, 72, 132, 128, False, True),
    "small": (5, 4, 8, 64, False, True),
    "transposed weight": (129, 64, 96, 64, True, True),
    "no rows": (0, 8, 16, 64, False, True),
    "one row": (1, 16, 16, 64, False, True),
    "unaligned": (300, 70, 130, 128, False, False),
    "small unaligned": (5, 3, 7, 64, False, False),
    "no inner dimension": (5, 0, 8, 64, False, False),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def kernel_against_reference(M: int, K: int, N: int, block_n: int, transposed: bool, _: bool) -> dict:
    a = torch.randn(M, K)
    b = torch.randn(N, K).t() if transposed else torch.randn(K, N)
    out = torch.randn(M, N).relu()  # a ReLU's output: about half zeros
    grad, column_sums = relu_backward_matmul(a, b, out, block_n=block_n)
    expected = (a.double() @ b.double()) * (out > 0)
    return {"grad": relative_error(grad, expected), "sum": relative_error(column_sums.sum(0), expected.sum(0)),
            "shapes": [list(grad.shape), list(column_sums.shape)], "kernel": runs_kernel(a, b, out)}  # fmt: skip


def sums_of_masked_gradients(graph: torch.fx.Graph) -> int:
    """Sums that read the kernel's masked gradient (through views) instead of its column sums."""
    count = 0
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.sum.dim_IntList):
        source = node.args[0]
        while source.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
            source = source.args[0]
        count += source.target is operator.getitem and source.args[1] == 0 and source.args[0].target == KERNEL
    return count


class RecordOps(CustomGraphPass):
    """Records the ops of every graph inductor compiles, and its sums of masked gradients, after every other
    pass."""

    def __init__(self) -> None:
        self.graphs: list[list[str]] = []
        self.gradient_sums: list[int] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graphs.append([str(node.target) for node in graph.nodes if node.op == "call_function"])
        self.gradient_sums.append(sums_of_masked_gradients(graph))

    def uuid(self) -> None:
        return None


def compiled_against_eager(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """A training step's gradients of ``model`` compiled by inductor with the project's joint passes (the
    new one allowed on the CPU in float32) against eager ones, and the ops of the compiled backward graph."""
    loss_fn = lambda y: y.float().square().mean()
    expected = torch.autograd.grad(loss_fn(model(x)), list(model.parameters()))
    record = RecordOps()
    joint = Passes(FuseReluIntoAddmm(), FuseReluBackwardIntoMatmul(devices=("cpu",), dtypes=(torch.float32,)))
    options = {"joint_custom_post_pass": joint, "post_grad_custom_post_pass": record}
    compiled = torch.compile(model, fullgraph=True, dynamic=False, options=options)
    grads = torch.autograd.grad(loss_fn(compiled(x)), list(model.parameters()))
    _, backward_ops = record.graphs
    return {"grads": max(relative_error(g, e) for g, e in zip(grads, expected)),
            "kernels": backward_ops.count("megabyte.relu_backward_matmul.default"),
            "masks left": sum(op in ("aten.where.self", "aten.le.Scalar") for op in backward_ops),
            "gradient sums left": record.gradient_sums[1]}  # fmt: skip


def float32_bias_sum() -> dict:
    """The bias gradient as CUDA's autocast writes it, a sum over rows accumulated in float32
    (``dtype=torch.float32``), through the pass on a traced graph: it must read the column sums too."""

    def backward(a, b, h):  # as in a joint graph: h and the gradient (4, 50, 40), products (200, 40)
        grad = torch.where(h <= 0, torch.full((), 0.0), (a @ b).view(4, 50, 40))
        return grad, grad.view(200, 40).sum(0, keepdim=True, dtype=torch.float32)

    a, b, h = torch.randn(200, 16), torch.randn(16, 40), torch.randn(4, 50, 40).relu()
    traced = make_fx(backward, tracing_mode="fake")(a, b, h)
    before = len(traced.graph.find_nodes(op="call_function", target=torch.ops.aten.sum.dim_IntList))
    FuseReluBackwardIntoMatmul(devices=("cpu",), dtypes=(torch.float32,))(traced.graph)
    traced.recompile()
    (grad, total), (expected_grad, expected_total) = traced(a, b, h), backward(a, b, h)
    return {"sums before": before, "kernels": len(traced.graph.find_nodes(op="call_function", target=KERNEL)),
            "gradient sums left": sums_of_masked_gradients(traced.graph),
            "grad": relative_error(grad, expected_grad), "sum": relative_error(total, expected_total)}  # fmt: skip


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    a, b, out = torch.randn(33, 16), torch.randn(16, 40), torch.randn(33, 40).relu()
    opcheck = torch.library.opcheck(torch.ops.megabyte.relu_backward_matmul.default, (a, b, out, 64, 3, 4))
    megabyte = MegaByte(tiny_megabyte_config(init_std=0.3))
    print(json.dumps({
        "cases": {name: kernel_against_reference(*case) for name, case in CASES.items()},
        "feed-forward": compiled_against_eager(FeedForward(16, 64, dropout=0.0), torch.randn(3, 8, 16)),
        "megabyte": compiled_against_eager(megabyte, torch.randint(0, 256, (2, 64))),
        "float32 bias sum": float32_bias_sum(),
        "opcheck": {name: result == "SUCCESS" for name, result in opcheck.items()},
    }))  # fmt: skip
