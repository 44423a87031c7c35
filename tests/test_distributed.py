"""Several processes (DDP, FSDP): every evaluation byte counted once, training passes shared out.

The DDP test runs 2 processes on the CPU (gloo), started together as a cluster launcher (torchrun,
SLURM) starts them: Lightning's own launcher would start the second only once the first has imported
everything, twice the time. The other tests are pure: they give the DataModule the data-parallel size
and rank a Trainer would.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import Mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch.distributed.fsdp import ShardingStrategy
from torch.utils.data import DistributedSampler

from datamodules import TextDataModule
from datamodules.windows import ResumableSampler
from megabyte import MegaByteLM
from megabyte.model import Block
from tests import ddp_run
from tests.conftest import REPO, tiny_megabyte_config


@pytest.fixture
def corpus(tmp_path) -> Path:
    """39,000 bytes of text: a val split of 1,950 bytes, 61 windows of 32 bytes, the last of 30."""
    path = tmp_path / "corpus.txt"
    path.write_bytes((Path(os.__file__).read_bytes()[:20_000] * 2)[:39_000])
    return path


def as_process(data: TextDataModule, replicas: int, rank: int, batches: int = 0) -> TextDataModule:
    """``data`` as process ``rank`` of ``replicas`` sees it (what Lightning's Trainer tells it), after
    ``batches`` training batches of the pass under way."""
    counts = SimpleNamespace(ready=batches, started=batches, processed=batches, completed=batches)
    progress = SimpleNamespace(current=counts)
    data.trainer = SimpleNamespace(
        distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank} if replicas > 1 else None,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    return data


@pytest.mark.parametrize(
    "seq_len, replicas, batch_size",
    [(32, 2, 2), (32, 3, 4), (1024, 3, 1)],
    ids=["a-batch-of-padding-only", "3-processes", "fewer-windows-than-processes"],
)
def test_evaluation_counts_every_byte_once_and_every_process_runs_as_many_batches(
    corpus, tmp_path, seq_len, replicas, batch_size
):
    data = TextDataModule(str(corpus), seq_len=seq_len, batch_size=batch_size, num_workers=0, cache_dir=str(tmp_path))
    data.setup("validate")
    for split in ("val", "test"):
        loaders = [getattr(as_process(data, replicas, r), f"{split}_dataloader")() for r in range(replicas)]
        # A DistributedSampler: Lightning leaves it as it is (it would repeat windows to even out the shares)
        assert all(isinstance(loader.sampler, DistributedSampler) for loader in loaders)
        batches = [list(loader) for loader in loaders]
        assert len({len(b) for b in batches}) == 1  # FSDP gathers weights in every forward: none may wait
        windows = [[x[m].numpy() for x, mask in b for x, m in zip(x, mask)] for b in batches]
        dealt = [windows[i % replicas][i // replicas] for i in range(sum(map(len, windows)))]  # window i: rank i % R
        assert np.array_equal(np.concatenate(dealt), data.splits[split])  # in order, each byte once
        if (seq_len, replicas) == (32, 2):  # 61 windows: rank 1's last batch is 1 empty window
            assert batches[1][-1][0].shape == (1, 1) and not batches[1][-1][1].any()
    if seq_len == 1024:  # 2 windows, 3 processes: the third evaluates an empty window (one masked byte)
        (only,) = list(as_process(data, replicas, 2).val_dataloader())
        assert only[0].shape == (1, 1) and not only[1].any()


def test_a_training_pass_is_dealt_out_like_one_process_with_a_larger_batch():
    single = ResumableSampler(100, 50, seed=3, replacement=True)
    one = [list(single), list(single)]  # two passes
    for replicas in (2, 3):
        samplers = [ResumableSampler(100, 50, 3, True, num_replicas=replicas, rank=r) for r in range(replicas)]
        for pass_ in one:
            shares = [list(s) for s in samplers]
            assert all(len(share) == 50 // replicas == len(s) for share, s in zip(shares, samplers))
            # step k of every process, batch B each = step k of one process with batch replicas x B
            assert all(shares[r] == pass_[r : 50 // replicas * replicas : replicas] for r in range(replicas))
    resumed = ResumableSampler(100, 50, 3, True, epoch=1, start=8, num_replicas=2, rank=1)  # 4 steps of 2 x 1
    resumed.set_epoch(7)  # Lightning's epoch count is ignored: the pass is the sampler's own
    assert list(resumed) == one[1][1:50:2][4:] and len(resumed) == 25  # a whole share: Lightning counts 4
    with pytest.raises(ValueError, match="Invalid rank 2"):
        ResumableSampler(100, 50, 3, True, num_replicas=2, rank=2)


@pytest.mark.parametrize("before, after", [(2, 1), (2, 3), (1, 2), (3, 3)])
def test_a_checkpoint_resumes_its_pass_on_any_number_of_processes(corpus, tmp_path, before, after):
    """The windows trained on before and after the checkpoint are those of the pass, each once and in
    the order of one process with the global batch, up to the pass's last short global batch."""
    data = TextDataModule(str(corpus), seq_len=32, batch_size=2, num_workers=0, cache_dir=str(tmp_path))
    data.setup("fit")
    windows = len(data.splits["train"]) - 32 + 1
    whole = ResumableSampler(windows, len(data.splits["train"]) // 32, data.seed, True).indices(0).tolist()
    shares = [list(as_process(data, before, r, batches=3).train_dataloader().sampler) for r in range(before)]
    state = data.state_dict()  # 3 batches of 2 in each process
    assert state == {"train_epoch": 0, "train_samples": 3 * 2 * before}
    trained = [shares[r][i] for i in range(3 * 2) for r in range(before)]  # rank r's item i: window r + i R

    resumed = []
    for rank in range(after):
        data.load_state_dict(state)
        loader = as_process(data, after, rank, batches=3).train_dataloader()  # 3: the checkpoint's count
        resumed.append(list(loader.sampler))
        progress = data.trainer.fit_loop.epoch_loop.batch_progress.current
        assert len(loader) - progress.ready == len(resumed[-1]) // 2  # Lightning's epoch ends with the pass
        assert data.state_dict() == state  # nothing trained yet
        progress.processed += 1
        assert data.state_dict() == {"train_epoch": 0, "train_samples": 3 * 2 * before + 2 * after}
    trained += [resumed[r][i] for i in range(len(resumed[0]) // 2 * 2) for r in range(after)]
    assert trained == whole[: len(trained)] and len(whole) - len(trained) < 2 * after

    # Checkpoints written before train_samples counted each process's batches
    data.load_state_dict({"train_epoch": 0, "train_batches": 3, "train_processes": before})
    assert list(as_process(data, after, 0, batches=3).train_dataloader().sampler) == resumed[0]


def test_the_fsdp_config_shards_every_block():
    """The strategy block of configs/distributed/fsdp.yaml, built as the CLI builds it (the CLI's tests
    run every config on one CPU process, with the default strategy)."""
    config = yaml.safe_load((REPO / "configs" / "distributed" / "fsdp.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": config["trainer"]["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block} and strategy._state_dict_type == "full"


def test_under_fsdp_the_gradient_norm_is_fsdps_over_all_shards():
    """torch's clip_grad_norm_ would take the norm of this process's shard only (FSDP needs a GPU: the
    call is checked, not run)."""
    lm = MegaByteLM(tiny_megabyte_config())
    lm._trainer = SimpleNamespace(strategy=FSDPStrategy(), model=Mock())
    lm.configure_gradient_clipping(Mock(), gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    lm._trainer.model.clip_grad_norm_.assert_called_once_with(0.5)


def run_ranks(command: list[str], n: int, tmp_path: Path, timeout: float = 120) -> None:
    """Run ``command`` as the ``n`` processes of one DDP job on this machine, started together with the
    environment a cluster launcher gives them; stop them all when one fails (the others would wait for
    it) or time is up."""
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "NODE_RANK": "0", "WORLD_SIZE": str(n)}  # fmt: skip
    logs = [tmp_path / f"rank{r}.log" for r in range(n)]
    processes = []
    for r, log in enumerate(logs):
        with log.open("w") as out:
            rank_env = {**env, "LOCAL_RANK": str(r)}
            processes.append(subprocess.Popen(command, cwd=REPO, env=rank_env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while None in (codes := [p.poll() for p in processes]) and not any(codes):
            assert time.monotonic() < deadline, f"the {n} processes did not finish in {timeout} s"
            time.sleep(0.1)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [
        f"rank {r}, exit {p.returncode}: {log.read_text()[-2000:]}"
        for r, (p, log) in enumerate(zip(processes, logs)) if p.returncode
    ]  # fmt: skip
    assert not failed, "\n".join(failed)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend")
def test_ddp_on_two_cpu_processes_gives_the_val_bpb_of_one_process(corpus, tmp_path):
    """2 processes of batch 2 against 1 of batch 4: the same windows every step, each val byte once.

    The val bpb agree to 1e-6 (2 float32 ulps at 8 bits; measured: 6e-8): the gradients are the same
    up to float32 rounding (a mean of 2 process means against one mean of 4 windows), and so are the
    weights after 4 steps."""
    two = tmp_path / "two"
    run_ranks([sys.executable, "-m", "tests.ddp_run", str(corpus), str(two), "2", "2"], 2, tmp_path)
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the processes: the same float32 sums
    try:
        one = ddp_run.run(str(corpus), str(tmp_path / "one"), devices=1, batch_size=4)
    finally:
        torch.set_num_threads(threads)

    assert [r["world_size"] for r in ranks] == [2, 2] and one["world_size"] == 1
    for step, windows in enumerate(one["train"]):  # process r trains on windows r, r + 2 of the batch of 4
        assert ranks[0]["train"][step] == windows[0::2] and ranks[1]["train"][step] == windows[1::2]
    assert len(one["val_bpb"]) == 2
    for i in range(2):  # after 2 and 4 steps
        assert ranks[0]["val_bytes"][i] + ranks[1]["val_bytes"][i] == one["val_bytes"][i] == one["val_split"] == 1950
        assert ranks[0]["val_bpb"][i] == ranks[1]["val_bpb"][i]  # synced over the processes
        assert ranks[0]["val_bpb"][i] == pytest.approx(one["val_bpb"][i], abs=1e-6)
    assert one["val_bpb"][1] < one["val_bpb"][0]  # it trained
