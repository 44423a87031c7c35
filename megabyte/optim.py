"""The optimizer's side of training, free of Lightning: which parameters decay, the learning-rate
schedule, and gradient clipping on the device."""

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices of linear layers only; none on embeddings, pads, norms, biases."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"name": "decay", "params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


def lr_factor(step: int, warmup_steps: int, total_steps: float, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based):
    linear warm-up over ``warmup_steps``, then ``schedule`` decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or math.isinf(total_steps):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def clip_gradient_norm(parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer | None, max_norm: float) -> None:
    """Scale the gradients of ``parameters`` down to a total norm of at most ``max_norm``, on the device.

    A fused Adam / AdamW divides the gradients itself: it is given the divisor (``grad_scale``, the
    attribute through which AMP's gradient scaler talks to it), which saves a pass over every gradient;
    for other optimizers ``clip_grads_with_norm_`` scales the gradients. Under
    FSDP2 the gradients are shards (DTensors): the norm is over all of them, reduced over the processes."""
    parameters = list(parameters)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if divides_gradients(optimizer):
        # clip_grads_with_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); this is the same factor's inverse
        optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)
    else:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)


def divides_gradients(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer`` is a fused Adam / AdamW, which divides the gradients by its ``grad_scale``."""
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))
