"""The package's promises about its layout: the model imports with torch alone, and the class paths that
older checkpoints store still name the configs."""

import subprocess
import sys

import lightning as L
import pytest
import torch

from megabyte import MegaByteConfig, MegaByteLM
from megabyte.config import config_from_dict, config_to_dict
from tests.conftest import REPO, tiny_megabyte_config

TRAINING_LIBRARIES = ("lightning", "pytorch_lightning", "lightning_fabric", "jsonargparse", "torchmetrics")


def test_the_model_imports_without_lightning():
    probe = (
        "import sys, megabyte; megabyte.MegaByte; megabyte.generate; import megabyte.parallelize, megabyte.flops, "
        "megabyte.optim, megabyte.bits; print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(eval(result.stdout))
    assert "torch" in loaded and not loaded & set(TRAINING_LIBRARIES)


@pytest.mark.parametrize("class_path", ["megabyte.MegaByteConfig", "megabyte.model.MegaByteConfig", "megabyte.config.MegaByteConfig"])
def test_every_class_path_a_checkpoint_may_hold_names_the_config(class_path):
    config = tiny_megabyte_config()
    data = {**config_to_dict(config), "class_path": class_path}
    assert config_from_dict(data) == config
    assert config_to_dict(config)["class_path"] == "megabyte.MegaByteConfig"


@pytest.mark.filterwarnings("ignore:.*")
def test_a_checkpoint_naming_the_old_module_loads(tmp_path):
    """Checkpoints written before the configs had a module of their own store
    ``megabyte.model.MegaByteConfig`` and ``megabyte.lm.MegaByteLM``."""
    torch.manual_seed(0)
    lm = MegaByteLM(tiny_megabyte_config())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(lm)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["arch"]["class_path"] = "megabyte.model.MegaByteConfig"
    torch.save(checkpoint, path)
    loaded = MegaByteLM.load_from_checkpoint(path)
    assert isinstance(loaded.config, MegaByteConfig) and loaded.config == lm.config
    x = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(loaded.model(x), lm.model(x), rtol=0, atol=0)


def imported_modules(path) -> set[str]:
    """The full names of the modules that ``path`` imports."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_run_one_way_inside_the_model_package():
    """Only lm.py imports the training libraries; the architectures do not import the decoding loop or
    how they run; only the optional-speed imports reach into kernels/, each allowed to fail."""
    package = REPO / "megabyte"
    for path in sorted(package.rglob("*.py")):
        roots = {name.split(".")[0] for name in imported_modules(path)}
        if path.name != "lm.py":
            assert not roots & set(TRAINING_LIBRARIES), path
    for room in ("config.py", "attention.py", "transformer.py", "model.py"):
        assert not imported_modules(package / room) & {"megabyte.generation", "megabyte.parallelize", "megabyte.lm"}, room
    for path in sorted(package.glob("*.py")):
        if any(name.startswith("megabyte.kernels") for name in imported_modules(path)):
            assert "except ImportError" in path.read_text(), path


KERNELS_HIDDEN = """
import sys
if {hide}:
    sys.modules["megabyte.kernels"] = None  # every import from megabyte.kernels now raises ImportError
import torch
from megabyte import MegaByte, MegaByteConfig, generate
from megabyte import attention, parallelize
torch.manual_seed(0)
config = MegaByteConfig(max_seq_len=64, patch_size=4, d_global=32, n_global_layers=2, n_global_heads=2,
                        d_local=16, n_local_layers=2, n_local_heads=2)
model = MegaByte(config)
x = torch.randint(0, 256, (2, 64))
out = {{
    "kernel": attention.short_attention_kernel is not None,
    "passes": "joint_custom_post_pass" in parallelize.inductor_options("default"),
    "logits": model(x).sum().item(),
    "greedy": generate(model, x[:, :10], 20, temperature=0).tolist(),
}}
print(repr(out))
"""


def test_without_the_kernels_folder_the_model_computes_the_same():
    """megabyte/kernels/ is optional speed: with its imports failing, as if the folder were deleted, the
    model falls back to PyTorch's operations and gives the same logits and greedy bytes."""
    runs = {}
    for hide in (False, True):
        script = KERNELS_HIDDEN.format(hide=hide)
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[hide] = eval(result.stdout.strip().splitlines()[-1])
    assert runs[True]["kernel"] is False and runs[True]["passes"] is False
    assert runs[False]["passes"] is True
    assert runs[True]["logits"] == runs[False]["logits"] and runs[True]["greedy"] == runs[False]["greedy"]
