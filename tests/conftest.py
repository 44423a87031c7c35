import json
import os
import subprocess
import sys
from pathlib import Path

# make test runs the suite in two pytest-xdist processes on a 2-core machine: one thread each, so they
# do not fight over the cores (the processes the tests start inherit it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
# Inductor checks which vector instructions the C++ compiler and the CPU support by compiling and loading
# probes, a new Python process each, in every process that compiles for the CPU (about 5 s a process on
# the CI machine); with this it takes the CPU's flags as they are and probes only their extensions.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from megabyte import ByteTransformer, ByteTransformerConfig, MegaByte, MegaByteConfig

REPO = Path(__file__).resolve().parent.parent


def run_interpreted(script: str) -> dict:
    """The JSON that ``script`` (a path under the repository) prints last, run under Triton's interpreter
    (TRITON_INTERPRET=1): the interpreter is chosen when kernels are defined, so it runs in a process of
    its own."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tiny_megabyte_config(**overrides) -> MegaByteConfig:
    kwargs = dict(
        max_seq_len=64, patch_size=4, d_global=32, n_global_layers=2, n_global_heads=2,
        d_local=16, n_local_layers=2, n_local_heads=2, dropout=0.0,
    )  # fmt: skip
    kwargs.update(overrides)
    return MegaByteConfig(**kwargs)


def tiny_transformer_config(**overrides) -> ByteTransformerConfig:
    kwargs = dict(max_seq_len=64, d_model=32, n_layers=2, n_heads=2, dropout=0.0)
    kwargs.update(overrides)
    return ByteTransformerConfig(**kwargs)


@pytest.fixture(params=["megabyte", "transformer"])
def tiny_model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    if request.param == "megabyte":
        return MegaByte(tiny_megabyte_config()).eval()
    return ByteTransformer(tiny_transformer_config()).eval()


@pytest.fixture
def text_file(tmp_path) -> Path:
    """About 40 KB of real text: the source of a stdlib module, repeated."""
    source = Path(os.__file__).read_bytes()[:20_000]
    path = tmp_path / "corpus.txt"
    path.write_bytes(source * 2)
    return path


@pytest.fixture
def data_dir() -> Path:
    """The real datasets (``$MEGABYTE_DATA``); tests that need them are skipped without it."""
    if "MEGABYTE_DATA" not in os.environ:
        pytest.skip("MEGABYTE_DATA is not set")
    return Path(os.environ["MEGABYTE_DATA"])
