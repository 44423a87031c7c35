"""torch.compile, applied from outside the model: the options every compilation here uses (training,
evaluation, decoding steps) and the inductor pass they add."""

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


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
            view, addmm = None, relu.args[0]
            if addmm.target in (aten.view.default, aten.reshape.default) and len(addmm.users) == 1:
                view, addmm = addmm, addmm.args[0]  # (N*L, d) -> (N, L, d)
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


def inductor_options(mode: str) -> dict:
    """Inductor's options of torch.compile's ``mode`` ("default", "reduce-overhead", "max-autotune", ...),
    with ``FuseReluIntoAddmm`` added (torch.compile takes a mode or options, not both). On a graph with a
    backward pass the joint pass leaves the post-grad pass nothing to do."""
    options = {} if mode == "default" else dict(torch._inductor.list_mode_options(mode))
    fuse = FuseReluIntoAddmm()
    return {**options, "joint_custom_post_pass": fuse, "post_grad_custom_pre_pass": fuse}
