"""Compilation and sharding, applied to a model from outside (as torchtitan does): the model's own
code holds no distributed code. ``MegaByteLM.configure_model`` calls ``parallelize`` once per run."""

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from megabyte.model import Block


def parallelize(model: nn.Module, compile_options: dict | None = None, mesh: DeviceMesh | None = None) -> None:
    """Compile and / or shard ``model`` (MegaByte or ByteTransformer) in place.

    Without ``mesh`` (one device, or DDP, which Lightning wraps around it afterwards) the whole model
    is compiled as one graph. With ``mesh``, the data-parallel processes' 1-D device mesh, it is
    sharded with FSDP2 (``fully_shard``): every transformer ``Block`` is a unit whose weights are
    gathered before its forward pass and freed after it, and the rest (embeddings, pads, norms, output)
    is the root unit (with the local blocks too when the local model runs in chunks: they are called
    several times a step). Compilation is then per block, before sharding (torchtitan's order): FSDP's
    hooks run around the compiled graph of each block, which is the same code for every block of a stack.
    ``compile_options``: ``torch.compile``'s inductor options; None: no compilation.
    Parameter names, hence checkpoints, are unchanged either way (``nn.Module.compile`` works in place).
    """
    if mesh is None:
        if compile_options is not None and getattr(model, "_compiled_call_impl", None) is None:
            model.compile(fullgraph=True, dynamic=False, options=compile_options)
        return
    if isinstance(model, FSDPModule):  # already sharded (a second Trainer call on the same model)
        return
    # A local model run in chunks (``local_chunk_patches``) calls its blocks several times a step: they
    # are left in the root unit, gathered once a step (as units of their own, a 2-process run hung).
    in_root = set(model.local_model.blocks) if getattr(model, "local_chunk_patches", None) is not None else set()
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        if compile_options is not None:
            block.compile(fullgraph=True, dynamic=False, options=compile_options)
        if block not in in_root:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
