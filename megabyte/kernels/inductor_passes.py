"""Inductor graph passes that every compilation of the project adds (training, evaluation, decoding
steps): each rewrites a pattern of the graph into fewer kernels computing the same values.
``megabyte.parallelize.inductor_options`` puts them into torch.compile's options."""

import contextlib
import operator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

try:
    from megabyte.kernels import relu_backward
except ImportError:  # no Triton: the pass below changes nothing
    relu_backward = None


def _through_view(
    node: torch.fx.Node, views: tuple = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)
) -> tuple[torch.fx.Node | None, torch.fx.Node]:
    """(the view, what it views) when ``node`` is one of ``views`` used once, e.g. a reshape between a
    matrix product (M, N) and its consumer (B, T, N), or a transpose of a product; else (None, node)."""
    if node.target in views and len(node.users) == 1:
        return node, node.args[0]
    return None, node


class FuseReluIntoAddmm(CustomGraphPass):
    """An inductor pass: relu(x @ W.T + b) becomes one matrix product whose epilogue adds the bias and
    applies the ReLU (cuBLASLt's ``_addmm_activation``). Inductor would otherwise add the bias and apply
    the ReLU in a kernel of its own, which reads and writes the whole hidden activation again (in
    training) or costs a few microseconds whatever its size (decoding at batch 1).

    In training it runs on the joint forward-backward graph, before inductor decides what the forward
    pass saves: the ReLU's backward then reads the saved output of the product (kept anyway for the
    next layer's weight gradient) instead of a mask that a kernel of its own would write in the
    forward pass. Without autograd (evaluation, decoding) it runs on the graph after decompositions."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for relu in list(graph.find_nodes(op="call_function", target=aten.relu.default)):
            view, addmm = _through_view(relu.args[0])
            if addmm.target != aten.addmm.default or len(addmm.users) != 1 or addmm.kwargs:
                continue
            with graph.inserting_before(relu):
                fused = graph.call_function(aten._addmm_activation.default, addmm.args)
                fused.meta["val"] = addmm.meta["val"]
                out = fused
                if view is not None:
                    out = graph.call_function(view.target, (fused, *view.args[1:]))
                    out.meta["val"] = view.meta["val"]
            relu.replace_all_uses_with(out)
            for node in (relu, view, addmm):
                if node is not None:
                    graph.erase_node(node)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _add_node(graph: torch.fx.Graph, target, *args) -> torch.fx.Node:
    """A call of ``target`` on ``args`` before the graph's current insertion point, with its ``meta["val"]``
    computed from the arguments' (fake) values, as the partitioner and inductor read it."""
    node = graph.call_function(target, args)
    values = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    fake_mode = torch._guards.detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    with fake_mode or contextlib.nullcontext():
        node.meta["val"] = target(*values)
    return node


def _is_zero(value) -> bool:
    if isinstance(value, torch.fx.Node):  # a 0-d tensor full of 0
        return value.target == torch.ops.aten.full.default and value.args[0] == [] and value.args[1] == 0
    return value == 0


class FuseReluBackwardIntoMatmul(CustomGraphPass):
    """An inductor pass on the joint forward-backward graph: the ReLU's backward of a product's output,
    ``where(h <= 0, 0, a @ b)``, becomes one ``relu_backward.relu_backward_matmul`` kernel (the mask in the
    product's epilogue), and the bias gradient, the sum of that over rows, a sum of the kernel's column
    sums. Inductor would otherwise write the product, read it again with ``h`` to write the masked
    gradient, and read that once more for the sum: three passes over the largest activation of the layer
    where the kernel makes one. Applies to products on ``devices`` in ``dtypes`` (CUDA, bf16 / fp16: the kernel's float32
    product is exact, slower than cuBLAS; the tests add the CPU under Triton's interpreter and float32)."""

    def __init__(
        self, devices: tuple[str, ...] = ("cuda",), dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
    ) -> None:
        self.devices, self.dtypes = devices, dtypes

    def __call__(self, graph: torch.fx.Graph) -> None:
        if relu_backward is None:
            return
        aten = torch.ops.aten
        for where in list(graph.find_nodes(op="call_function", target=aten.where.self)):
            mask, zero, grad = where.args
            if mask.target != aten.le.Scalar or mask.args[1] != 0 or not _is_zero(zero):
                continue
            view, mm = _through_view(grad)
            value = where.meta["val"]
            if mm.target != aten.mm.default or len(mm.users) != 1:
                continue
            if value.device.type not in self.devices or mm.meta["val"].dtype not in self.dtypes:
                continue
            M, N = mm.meta["val"].shape
            if not isinstance(M, int) or not isinstance(N, int):  # dynamic shapes: not handled
                continue
            with graph.inserting_before(where):
                out = _add_node(graph, aten.reshape.default, mask.args[0], [M, N])  # the ReLU's output h
                fused = _add_node(graph, torch.ops.megabyte.relu_backward_matmul.default, *mm.args, out,
                                  relu_backward.BLOCK_N, relu_backward.NUM_STAGES, relu_backward.NUM_WARPS)  # fmt: skip
                masked = _add_node(graph, operator.getitem, fused, 0)
                column_sums = _add_node(graph, operator.getitem, fused, 1)
                new = _add_node(graph, aten.view.default, masked, list(value.shape)) if view is not None else masked
            where.replace_all_uses_with(new)
            for node in (where, mask, view, mm):
                if node is not None and not node.users:
                    graph.erase_node(node)
            self._sum_from_column_sums(graph, new, column_sums, M, N)

    @staticmethod
    def _sum_from_column_sums(graph: torch.fx.Graph, grad: torch.fx.Node, column_sums: torch.fx.Node, M: int, N: int) -> None:
        """``grad`` viewed as (M, N) summed over rows (the bias gradient) -> the column sums summed."""
        aten = torch.ops.aten
        views = [grad] + [u for u in grad.users if u.target in (aten.view.default, aten.reshape.default)]
        for view in views:
            if tuple(view.meta["val"].shape) != (M, N):
                continue
            for total in list(view.users):
                # a sum over rows, in its input's dtype or accumulated in float32 (CUDA's autocast asks
                # for that: ``dtype=torch.float32``), as the column sums are
                if total.target != aten.sum.dim_IntList or list(total.args[1]) != [0]:
                    continue
                if set(total.kwargs) - {"dtype"} or total.kwargs.get("dtype", torch.float32) != torch.float32:
                    continue
                with graph.inserting_before(total):
                    summed = _add_node(graph, aten.sum.dim_IntList, column_sums, [0], *total.args[2:])
                    new = _add_node(graph, torch.ops.prims.convert_element_type.default, summed, total.meta["val"].dtype)
                total.replace_all_uses_with(new)
                graph.erase_node(total)

    def uuid(self) -> bytes:
        files = (__file__, relu_backward.__file__ if relu_backward else __file__)
        return get_hash_for_files(files) + repr((self.devices, self.dtypes)).encode()  # the settings key the cache too


class ProductsInFloat32(CustomGraphPass):
    """An inductor pass on the joint forward-backward graph: a bf16 / fp16 product that is only cast to
    float32, ``convert_element_type(a @ b, float32)``, becomes one product that writes float32
    (``aten.mm.dtype``: cuBLAS stores its float32 accumulator). Under autocast these are the weight
    gradients of the float32 parameters: inductor would round each one to bf16, then cast it back in a
    kernel of its own, a pass over every weight gradient; the gradient is no longer rounded to bf16
    either. A transpose between the product and the cast stays, on the
    float32 result. Applies on ``devices`` (CUDA: ``aten.mm.dtype`` has no CPU kernel; the tests trace
    CPU graphs without running them)."""

    def __init__(self, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.devices = devices

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten, prims = torch.ops.aten, torch.ops.prims
        for cast in list(graph.find_nodes(op="call_function", target=prims.convert_element_type.default)):
            if cast.args[1] != torch.float32:
                continue
            transpose, mm = _through_view(cast.args[0], (aten.permute.default, aten.t.default))
            if mm.target != aten.mm.default or len(mm.users) != 1:
                continue
            value = mm.meta["val"]
            if value.device.type not in self.devices or value.dtype not in (torch.bfloat16, torch.float16):
                continue
            with graph.inserting_before(cast):
                new = _add_node(graph, aten.mm.dtype, *mm.args, torch.float32)
                if transpose is not None:
                    new = _add_node(graph, transpose.target, new, *transpose.args[1:])
            cast.replace_all_uses_with(new)
            for node in (cast, transpose, mm):
                if node is not None:
                    graph.erase_node(node)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,)) + repr(self.devices).encode()


class Passes(CustomGraphPass):
    """Several passes in one of inductor's custom pass slots, in order."""

    def __init__(self, *passes: CustomGraphPass) -> None:
        self.passes = passes

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> bytes:
        return b"".join(graph_pass.uuid() for graph_pass in self.passes)


def inductor_passes() -> dict:
    """The passes above, in inductor's custom pass slots. On a graph with a backward pass the joint
    passes leave the post-grad pass nothing to do."""
    fuse = FuseReluIntoAddmm()
    return {
        "joint_custom_post_pass": Passes(fuse, FuseReluBackwardIntoMatmul(), ProductsInFloat32()),
        "post_grad_custom_pre_pass": fuse,
    }
