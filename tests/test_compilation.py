"""megabyte/kernels/inductor_passes.py: the ReLU-into-matmul pass and the options every compilation uses."""

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from megabyte.kernels.inductor_passes import FuseReluIntoAddmm, ProductsInFloat32
from megabyte.parallelize import inductor_options
from megabyte.transformer import FeedForward


def test_relu_of_a_matrix_product_becomes_one_fused_product():
    """The inductor pass: relu(x @ W.T + b) -> _addmm_activation (bias and ReLU in the product's
    epilogue), for 2-D and 3-D inputs, with the same values; other products stay."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    aten = torch.ops.aten
    for x in (torch.randn(3, 8), torch.randn(2, 3, 8)):
        graph_module = make_fx(mlp)(x)
        FuseReluIntoAddmm()(graph_module.graph)
        graph_module.recompile()
        targets = [node.target for node in graph_module.graph.nodes]
        assert aten.relu.default not in targets and targets.count(aten._addmm_activation.default) == 1
        assert targets.count(aten.addmm.default) == 1  # the second layer's product, no ReLU after it
        torch.testing.assert_close(graph_module(x), mlp(x))


class RecordSaved(CustomGraphPass):
    """Records the dtypes a compiled graph returns (the forward graph: its output and what it saves for
    the backward) and the ops it runs, after every other pass."""

    def __init__(self) -> None:
        self.graphs: list[tuple[list[torch.dtype], list]] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        (output,) = graph.find_nodes(op="output")
        dtypes = [node.meta["val"].dtype for node in output.args[0] if isinstance(node, torch.fx.Node)]
        self.graphs.append((dtypes, [node.target for node in graph.nodes]))

    def uuid(self) -> None:  # not cacheable: the graphs are compiled, and recorded, every time
        return None


def test_training_graph_saves_the_product_and_no_relu_mask():
    """Compiled for training with the project's options, a feed-forward layer's forward pass computes
    the ReLU in the product (_addmm_activation) and saves no boolean mask for the backward pass (the
    backward derives it from the saved output); values and gradients equal the eager ones."""
    torch.manual_seed(0)
    mlp = FeedForward(16, 64, dropout=0.0)
    x = torch.randn(4, 8, 16, requires_grad=True)
    expected = mlp(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *mlp.parameters()])
    record = RecordSaved()
    compiled = torch.compile(mlp, fullgraph=True, options={**inductor_options("default"), "post_grad_custom_post_pass": record})
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    (forward_dtypes, forward_ops), _ = record.graphs  # the forward graph, then the backward graph
    assert torch.ops.aten._addmm_activation.default in forward_ops and torch.ops.aten.relu.default not in forward_ops
    assert torch.bool not in forward_dtypes
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def _traced_products(fn, *shapes, dtype=torch.bfloat16, devices=("cpu",)):
    """``fn`` traced on fake CPU tensors of ``shapes``, the product pass applied for ``devices`` (the CPU:
    as on CUDA)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = [torch.randn(*shape, dtype=dtype) for shape in shapes]
    traced = make_fx(fn, tracing_mode="fake")(*inputs)
    ProductsInFloat32(devices=devices)(traced.graph)
    traced.graph.lint()
    nodes = [node for node in traced.graph.nodes if node.op == "call_function"]
    (output,) = traced.graph.find_nodes(op="output")
    return [node.target for node in nodes], [node.meta["val"] for node in output.args[0]]


def test_a_product_cast_to_float32_is_written_in_float32():
    """A weight gradient as autocast's joint graph has it, the bf16 product (dY^T X) transposed and cast to
    float32, becomes one product that writes float32 (``aten.mm.dtype``), transposed: no cast, no bf16
    product left, the same shape and dtype out."""
    aten, prims = torch.ops.aten, torch.ops.prims

    def weight_gradient(dy, x):  # dy (M, N), x (M, K) -> (N, K) float32, through (K, N)
        return (prims.convert_element_type(aten.t(aten.mm(aten.t(x), dy)), torch.float32),)

    def permuted(dy, x):
        return (prims.convert_element_type(aten.permute(aten.mm(aten.t(x), dy), [1, 0]), torch.float32),)

    def plain(dy, x):  # (N, K) float32 straight from the product
        return (prims.convert_element_type(aten.mm(aten.t(dy), x), torch.float32),)

    for fn in (weight_gradient, permuted, plain):
        targets, (grad,) = _traced_products(fn, (64, 24), (64, 16))
        assert targets.count(aten.mm.dtype) == 1 and aten.mm.default not in targets
        assert prims.convert_element_type.default not in targets
        assert grad.dtype == torch.float32 and grad.shape == (24, 16)


def test_products_used_otherwise_stay():
    """A product whose bf16 value is used besides the cast, a float32 product, a cast to another dtype,
    and any product on a device the pass is not for (the CPU by default) are left as they are."""
    aten, prims = torch.ops.aten, torch.ops.prims

    def used_twice(a, b):
        product = aten.mm(a, b)
        return prims.convert_element_type(product, torch.float32), product

    def to_half(a, b):
        return (prims.convert_element_type(aten.mm(a, b), torch.float16),)

    for fn, dtype in ((used_twice, torch.bfloat16), (to_half, torch.bfloat16), (used_twice, torch.float32)):
        targets, _ = _traced_products(fn, (8, 4), (4, 6), dtype=dtype)
        assert aten.mm.dtype not in targets and aten.mm.default in targets

    def cast(a, b):
        return (prims.convert_element_type(aten.mm(a, b), torch.float32),)

    targets, _ = _traced_products(cast, (8, 4), (4, 6), devices=ProductsInFloat32().devices)  # CUDA only
    assert aten.mm.dtype not in targets and aten.mm.default in targets
