"""megabyte/compilation.py: the ReLU-into-matmul pass and the options every compilation uses."""

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from megabyte.compilation import FuseReluIntoAddmm, inductor_options
from megabyte.model import FeedForward


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
