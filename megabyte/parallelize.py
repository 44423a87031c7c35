"""How a model runs, applied from outside it: none of these options changes a parameter or what is
computed (beyond float rounding), so a checkpoint trains, resumes and evaluates with or without each.

``parallelize`` applies them in one order, torchtitan's:
1. activation checkpointing: the named Transformer stacks keep only each block's input in training and
   recompute the block in the backward pass (torch's checkpoint wrapper around every block);
2. local chunking: MegaByte runs its local model over at most ``local_chunk_patches`` patches at a
   time; with ``local_model`` checkpointed each chunk is recomputed as a whole instead of block by block,
   so the local model keeps one chunk's activations instead of all B*K patches';
3. compilation: ``torch.compile`` with ``inductor_options`` (the whole model as one graph, or each
   block on its own when sharded);
4. FSDP2: every block a unit of ``fully_shard`` over the data-parallel mesh, the rest the root unit.
"""

import types
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.utils.checkpoint import checkpoint

from megabyte.model import MegaByte
from megabyte.transformer import Block, KVCache, Transformer

try:  # the inductor passes are optional speed: without them compilation computes the same
    from megabyte.kernels.inductor_passes import inductor_passes
except ImportError:
    inductor_passes = None

# torch.compile's modes that replay CUDA graphs, each with the mode that is the same without them. Sharded
# models (FSDP gathers each block's weights into new memory every step, which a graph would have to
# record again) and gradient accumulation (a backward graph's replay overwrites the gradients the previous
# micro-batch left in ``.grad``, its own output: pytorch/pytorch#169545) take the latter.
_WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def uses_cuda_graphs(mode: str) -> bool:
    """Whether torch.compile's ``mode`` replays CUDA graphs."""
    return mode in _WITHOUT_CUDA_GRAPHS


def without_cuda_graphs(mode: str) -> str:
    """The mode that compiles as ``mode`` does, without CUDA graphs."""
    return _WITHOUT_CUDA_GRAPHS.get(mode, mode)


def inductor_options(mode: str) -> dict:
    """Inductor's options of torch.compile's ``mode`` ("default", "reduce-overhead", "max-autotune", ...),
    with ``megabyte.kernels``' graph passes added (torch.compile takes a mode or options, not both) and
    programmatic dependent launch on (Hopper and later: a kernel starts while the previous one finishes)."""
    options = {} if mode == "default" else dict(torch._inductor.list_mode_options(mode))
    if inductor_passes is not None:
        options.update(inductor_passes())
    return {**options, "triton.enable_pdl": True}


def stacks(model: nn.Module) -> list[str]:
    """The attribute names of ``model``'s Transformer stacks: ``global_model`` and ``local_model`` of
    MegaByte, ``transformer`` of the ByteTransformer."""
    return sorted(name for name, module in model.named_children() if isinstance(module, Transformer))


def check_run_options(
    model: nn.Module, activation_checkpointing: Sequence[str] = (), local_chunk_patches: int | None = None
) -> None:
    """Refuse options that ``model`` cannot run with, naming the valid ones."""
    unknown = sorted(set(activation_checkpointing) - set(stacks(model)))
    if unknown:
        raise ValueError(
            f"activation_checkpointing names {unknown}, not a stack of {type(model).__name__}: "
            f"choose among {stacks(model)}"
        )
    if local_chunk_patches is not None:
        if not isinstance(model, MegaByte):
            raise ValueError(f"local_chunk_patches chunks MegaByte's local model; {type(model).__name__} has none: use null")
        if isinstance(local_chunk_patches, bool) or not isinstance(local_chunk_patches, int) or local_chunk_patches < 1:
            raise ValueError(f"local_chunk_patches must be a positive integer or null, got {local_chunk_patches!r}")


def recompute_in_backward(
    block: Block, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
) -> torch.Tensor:
    """Run ``block`` keeping only its input for the backward pass, which recomputes it; without
    gradients, or decoding with a key/value cache, run it as it is (nothing to keep)."""
    if cache is not None or not torch.is_grad_enabled():
        return block(x, cache, layer)
    # Non-reentrant checkpointing: composes with torch.compile (one graph) and autocast.
    return checkpoint(block, x, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, names: Sequence[str]) -> None:
    """Wrap every block of the stacks ``names`` in torch's checkpoint wrapper. The wrapper keeps
    parameter names in state dicts, so checkpoints are the same with or without it."""
    for name in names:
        blocks = getattr(model, name).blocks
        for i, block in enumerate(blocks):
            if not isinstance(block, CheckpointWrapper):
                blocks[i] = checkpoint_wrapper(block, checkpoint_fn=recompute_in_backward)


def checkpointed_stacks(model: nn.Module) -> list[str]:
    """The stacks of ``model`` whose blocks are recomputed in the backward pass (by block or by chunk)."""
    chunking = vars(model).get("local_logits")  # set by chunk_local_model
    by_chunk = chunking is not None and chunking.recompute
    return [
        name for name in stacks(model)
        if isinstance(getattr(model, name).blocks[0], CheckpointWrapper) or (name == "local_model" and by_chunk)
    ]  # fmt: skip


def chunk_local_model(model: MegaByte, patches: int, recompute: bool) -> None:
    """Make MegaByte run steps 4-7 (``local_logits``) over at most ``patches`` patches at a time: the
    same logits, as every patch is independent of the others given its inputs (with cross-patch
    attention, its window: the previous patch's last bytes are part of them). ``recompute``: keep only
    each chunk's inputs for the backward pass, which recomputes the chunk as a whole."""

    def chunked_local_logits(self: MegaByte, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        local_logits = type(self).local_logits  # the unchunked steps 4-7
        logits = []
        for h_c, x_c in zip(h.split(patches), x.split(patches)):
            if recompute and torch.is_grad_enabled():
                logits.append(checkpoint(local_logits, self, h_c, x_c, use_reentrant=False))
            else:
                logits.append(local_logits(self, h_c, x_c))
        return torch.cat(logits)  # (N, P, V)

    chunked_local_logits.patches, chunked_local_logits.recompute = patches, recompute
    # A method of this instance (a bound method survives copy.deepcopy, rebound to the copy).
    model.local_logits = types.MethodType(chunked_local_logits, model)


def local_chunk_patches(model: nn.Module) -> int | None:
    """The chunk size ``chunk_local_model`` gave ``model``; None runs all patches at once."""
    method = vars(model).get("local_logits")
    return None if method is None else method.patches


def parallelize(
    model: nn.Module,
    activation_checkpointing: Sequence[str] = (),
    local_chunk_patches: int | None = None,
    compile_options: dict | None = None,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Apply the options of this module to ``model`` (MegaByte or ByteTransformer) in place, in order.

    activation_checkpointing: the stacks whose blocks are recomputed in the backward pass.
    local_chunk_patches: MegaByte's local model runs over at most this many patches at a time; None: all.
    compile_options: ``torch.compile``'s inductor options (``inductor_options``); None: no compilation.
    mesh: the data-parallel processes' 1-D device mesh, to shard over with FSDP2; None: no sharding (one
        device, or DDP, which Lightning wraps around the model afterwards).
    Parameter names, hence checkpoints, are unchanged (``nn.Module.compile`` works in place). Applying
    the same options again changes nothing (a second Trainer call on one model).
    """
    check_run_options(model, activation_checkpointing, local_chunk_patches)
    chunked = local_chunk_patches is not None
    # 1. Activation checkpointing; the chunked local model is recomputed by chunks (step 2) instead.
    apply_activation_checkpointing(
        model, [name for name in activation_checkpointing if not (chunked and name == "local_model")]
    )
    # 2. Local chunking.
    if chunked:
        chunk_local_model(model, local_chunk_patches, recompute="local_model" in activation_checkpointing)
    if mesh is None:
        # 3. Compilation, the whole model as one graph.
        if compile_options is not None and getattr(model, "_compiled_call_impl", None) is None:
            model.compile(fullgraph=True, dynamic=False, options=compile_options)
        return model
    if isinstance(model, FSDPModule):  # already sharded
        return model
    # A chunked local model calls its blocks several times a step: they stay in the root unit, gathered
    # once a step (units of their own would be gathered and freed once per chunk).
    in_root = set(model.local_model.blocks) if chunked else set()
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        # 3. Compilation per block, before sharding: FSDP's hooks run around the compiled graph of each
        # block, which is the same code for every block of a stack.
        if compile_options is not None:
            block.compile(fullgraph=True, dynamic=False, options=compile_options)
        # 4. FSDP2: each block a unit whose weights are gathered before its forward pass, freed after.
        if block not in in_root:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
