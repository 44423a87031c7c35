"""Activation checkpointing and the chunked local model (``megabyte.parallelize``): the same logits and
gradients as without, fewer activations kept for the backward pass, one graph under torch.compile."""

import pytest
import torch
import torch._dynamo

from megabyte import ByteTransformer, MegaByte
from megabyte.bits import byte_bits
from megabyte.parallelize import checkpointed_stacks, local_chunk_patches, parallelize
from tests.conftest import tiny_megabyte_config, tiny_transformer_config


def logits_and_gradients(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits = model(x)
    return logits, torch.autograd.grad(byte_bits(logits, x).mean(), list(model.parameters()))


@pytest.mark.parametrize(
    "arch, stacks, chunk",
    [
        ("megabyte", ["global_model"], None),
        ("megabyte", ["local_model"], None),
        ("megabyte", [], 5),  # 2 x 10 patches in 4 chunks
        ("megabyte", ["local_model"], 3),  # 6 chunks of 3 and one of 2, each recomputed as a whole
        ("megabyte", ["global_model", "local_model"], 7),
        ("megabyte-cross-patch", ["local_model"], None),
        ("megabyte-cross-patch", ["local_model"], 3),  # windows of 2 + 4 bytes, chunked like patches
        ("transformer", ["transformer"], None),
    ],
)
def test_checkpointing_and_chunks_give_the_same_logits_and_gradients(arch, stacks, chunk):
    torch.manual_seed(0)
    make = {
        "megabyte": lambda: MegaByte(tiny_megabyte_config()),
        "megabyte-cross-patch": lambda: MegaByte(tiny_megabyte_config(cross_patch_bytes=2)),
        "transformer": lambda: ByteTransformer(tiny_transformer_config()),
    }[arch]()
    model = make.double()
    x = torch.randint(0, 256, (2, 37))  # 37 bytes: the last of 10 patches is padded
    logits, grads = logits_and_gradients(model, x)
    parallelize(model, stacks, chunk)
    chunked_logits, chunked_grads = logits_and_gradients(model, x)
    torch.testing.assert_close(chunked_logits, logits)
    for (name, _), grad, reference in zip(model.named_parameters(), chunked_grads, grads):
        torch.testing.assert_close(grad, reference, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # evaluation: chunks, no recomputation
        torch.testing.assert_close(model(x), logits)


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``model(x)``, parameters excluded
    (a recomputed region keeps none of its own: only what its recomputation needs)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())


def test_checkpointing_keeps_a_fraction_of_the_activations():
    """Checkpointing both stacks, with the local model in chunks, keeps under a tenth of the activations;
    with its local model recomputed by chunks, MegaByte keeps no more for 3 local blocks than for 1."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 256))
    saved = {}
    for n_local_layers in (1, 3):
        model = MegaByte(tiny_megabyte_config(max_seq_len=256, n_local_layers=n_local_layers))
        saved["plain", n_local_layers] = saved_activation_bytes(model, x)
        parallelize(model, ["local_model"], 16)
        saved["local", n_local_layers] = saved_activation_bytes(model, x)
        parallelize(model, ["global_model", "local_model"], 16)
        saved["both", n_local_layers] = saved_activation_bytes(model, x)
    assert saved["plain", 3] > 1.5 * saved["plain", 1]
    assert saved["local", 3] == saved["local", 1] < saved["plain", 1] / 2
    assert saved["both", 3] < saved["plain", 3] / 10


def test_checkpointed_chunks_compile_to_one_graph():
    torch.manual_seed(0)
    model = MegaByte(tiny_megabyte_config(n_global_layers=1, n_local_layers=1))
    parallelize(model, ["global_model", "local_model"], 5)
    x = torch.randint(0, 256, (2, 32))
    logits, grads = logits_and_gradients(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break would fail
    compiled_logits, compiled_grads = logits_and_gradients(compiled, x)
    torch.testing.assert_close(compiled_logits, logits)
    for grad, reference in zip(compiled_grads, grads):
        torch.testing.assert_close(grad, reference)


def test_the_options_applied_can_be_read_back_and_keep_state_dict_names():
    torch.manual_seed(0)
    model = MegaByte(tiny_megabyte_config())
    names = list(model.state_dict())
    assert checkpointed_stacks(model) == [] and local_chunk_patches(model) is None
    parallelize(model, ["global_model"])
    assert checkpointed_stacks(model) == ["global_model"] and local_chunk_patches(model) is None
    parallelize(model, ["global_model", "local_model"], 3)
    assert checkpointed_stacks(model) == ["global_model", "local_model"] and local_chunk_patches(model) == 3
    assert list(model.state_dict()) == names
    with pytest.raises(ValueError, match=r"choose among \['global_model', 'local_model'\]"):
        parallelize(model, ["transformer"])
