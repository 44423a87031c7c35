"""Several processes (DDP, FSDP): every evaluation byte counted once, training passes shared out and
resumed on any number of processes, samples, predictions and non-finite losses handled together.

One test runs 2 processes on the CPU (gloo) through DDP and FSDP2 (tests/ddp_run.py), started together
as a cluster launcher (torchrun, SLURM) starts them: Lightning's own launcher would start the second
only once the first has imported everything, twice the time. The other tests are pure: they give the
DataModule the data-parallel size and rank a Trainer would.
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
import lightning as L
from jsonargparse import dict_to_namespace
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DistributedSampler

from callbacks.predictions import BitsWriter
from cli import fill_data_parallel_size, main as cli_main
from sampling import as_code_block, generate_samples, validation_prompts
from datamodules import TextDataModule
from datamodules.windows import ResumableSampler
from megabyte import MegaByteLM
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


def test_the_fsdp_config_shards_over_every_process_and_writes_one_checkpoint_file():
    """configs/distributed/fsdp.yaml's strategy as the CLI builds it (the CLI's tests run every config on
    one CPU process, with the default strategy), here for 3 processes: data_parallel_size "auto" becomes
    3. Its sharding of every block is MegaByteLM.configure_model's, run by the 2-process test."""
    cli = cli_main(["--config=configs/distributed/fsdp.yaml", "--trainer.accelerator=cpu", "--trainer.devices=3",
                    "--trainer.precision=32-true", "--trainer.logger=false"], run=False)  # fmt: skip
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy) and not strategy._save_distributed_checkpoint
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (3, 1)


@pytest.mark.parametrize(
    "devices, num_nodes, init_args, expected",
    [
        (2, 1, {"tensor_parallel_size": 1, "data_parallel_size": "auto"}, 2),
        (4, 3, {"tensor_parallel_size": 1}, 12),  # "auto" is ModelParallelStrategy's default
        ([0, 1, 3], 2, {"tensor_parallel_size": 1, "data_parallel_size": "auto"}, 6),
        ("0,1", 1, {"tensor_parallel_size": 1, "data_parallel_size": "auto"}, 2),
        ("2", 1, {"tensor_parallel_size": 1, "data_parallel_size": "auto"}, 2),
        ("auto", 1, {"tensor_parallel_size": 1, "data_parallel_size": "auto"}, "auto"),  # Lightning counts
        (-1, 1, {"tensor_parallel_size": 1, "data_parallel_size": "auto"}, "auto"),
        (4, 1, {"tensor_parallel_size": 2, "data_parallel_size": "auto"}, "auto"),  # tensor parallel: as given
        (4, 1, {"tensor_parallel_size": 1, "data_parallel_size": 2}, 2),  # as given (Lightning refuses it)
    ],
)
def test_data_parallel_size_auto_spans_every_process(devices, num_nodes, init_args, expected):
    """data_parallel_size is not typed twice: with tensor_parallel_size 1, "auto" is devices x num_nodes."""
    strategy = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": init_args}
    trainer = dict_to_namespace({"strategy": strategy, "devices": devices, "num_nodes": num_nodes})
    fill_data_parallel_size(trainer)
    assert trainer.strategy.init_args.get("data_parallel_size", "auto") == expected


def test_under_fsdp1_the_gradient_norm_is_fsdps_over_all_shards():
    """torch's clip_grad_norm_ would take the norm of this process's shard only (FSDPStrategy needs a
    GPU: the call is checked, not run; FSDP2's norm over DTensors is run by the 2-process test)."""
    lm = MegaByteLM(tiny_megabyte_config())
    lm._trainer = SimpleNamespace(strategy=FSDPStrategy(), model=Mock())
    lm.configure_gradient_clipping(Mock(), gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    lm._trainer.model.clip_grad_norm_.assert_called_once_with(0.5)


def run_ranks(command: list[str], n: int, tmp_path: Path, timeout: float = ddp_run.HANG_AFTER_S + 30) -> None:
    """Run ``command`` as the ``n`` processes of one DDP job on this machine, started together with the
    environment a cluster launcher gives them; stop them all when one fails (the others would wait for
    it) or time is up, and fail with the end of each process's output (tests/ddp_run.py prints its
    phases, and every thread's stack if it hangs)."""
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "NODE_RANK": "0", "WORLD_SIZE": str(n)}  # fmt: skip
    if Path("/sys/class/net/lo").exists():  # gloo talks over loopback, not the address the host name resolves to
        env["GLOO_SOCKET_IFNAME"] = "lo"
    logs = [tmp_path / f"rank{r}.log" for r in range(n)]
    processes = []
    for r, log in enumerate(logs):
        with log.open("w") as out:
            rank_env = {**env, "LOCAL_RANK": str(r)}
            processes.append(subprocess.Popen(command, cwd=REPO, env=rank_env, stdout=out, stderr=subprocess.STDOUT))
    deadline, timed_out = time.monotonic() + timeout, False
    try:
        while None in (codes := [p.poll() for p in processes]) and not any(codes):
            if timed_out := time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [
        f"rank {r}, exit {p.returncode}: {log.read_text()[-3000:]}"
        for r, (p, log) in enumerate(zip(processes, logs)) if p.returncode or timed_out
    ]  # fmt: skip
    assert not failed, (f"the {n} processes did not finish in {timeout} s\n" if timed_out else "") + "\n".join(failed)


def sample_texts(log_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """{tag: [(step, text), ...]} of the text samples in the TensorBoard events under ``log_dir``."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in accumulator.Tensors(tag)]
        for tag in accumulator.Tags()["tensors"]
    }


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend")
@pytest.mark.filterwarnings("ignore:.*your dataloader is not resumable")  # ours resume (ByteDataModule.state_dict)
def test_two_cpu_processes_under_ddp_and_fsdp_train_evaluate_sample_and_predict_as_one_process(corpus, tmp_path):
    """One launch of 2 processes (tests/ddp_run.py: DDP with gradient accumulation, FSDP2, a NaN loss in
    one process) against one process of batch 4 and the checkpoints loaded in one process.

    The val bpb agree to 1e-6 (2 float32 ulps at 8 bits; measured: 1.5e-7): the gradients, clipped to
    norm 1 over all processes, are the same up to float32 rounding (means of process means against
    one mean of 4 windows), and so are the weights after 4 steps."""
    two = tmp_path / "two"
    run_ranks([sys.executable, "-m", "tests.ddp_run", str(corpus), str(two)], 2, tmp_path)
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the processes: the same float32 sums
    try:
        one = ddp_run.run(str(corpus), str(tmp_path / "one"), devices=1, batch_size=4, steps=6)[0]
        # The checkpoints in one process: test, predict, samples and training resumed with batch 4
        single = {}
        for name in ("ddp", "fsdp"):
            data, model = ddp_run.data_and_model(str(corpus), str(tmp_path / name), batch_size=4)
            bits = BitsWriter(str(tmp_path / name / "bits.npy"))
            trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[bits],
                                enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
            test_bpb = trainer.test(model, data, ckpt_path=two / f"{name}.ckpt", verbose=False)[0]["test/bpb"]
            trainer.predict(model, data, ckpt_path=two / f"{name}.ckpt", return_predictions=False)
            data.setup("validate")
            sampling = ddp_run.SAMPLES
            prompts, _, sample_len = validation_prompts(data, sampling["n_samples"], sampling["sample_len"], 0.5)
            seed, temperature = sampling["seed"], sampling["temperature"]
            samples = generate_samples(trainer, model.model, prompts, sample_len, seed, temperature)
            single[name] = {"test_bpb": test_bpb, "samples": [data.decode(s[prompts.shape[1] :]) for s in samples]}
            record = ddp_run.Record()
            data, model = ddp_run.data_and_model(str(corpus), str(tmp_path / name / "resumed"), batch_size=4)
            ddp_run.trainer(1, "auto", 6, [record]).fit(model, data, ckpt_path=two / f"{name}.ckpt")
            single[name]["resumed"] = record
    finally:
        torch.set_num_threads(threads)

    assert [r["ddp"]["world_size"] for r in ranks] == [2, 2] and one["world_size"] == 1
    for step, windows in enumerate(one["train"][:4]):
        for j in range(2):  # DDP, batch 1, 2 batches a step: process r's batch j of the step is window 2 j + r
            assert [ranks[r]["ddp"]["train"][2 * step + j] for r in range(2)] == [[windows[2 * j + r]] for r in range(2)]
        assert [ranks[r]["fsdp"]["train"][step] for r in range(2)] == [windows[0::2], windows[1::2]]  # FSDP, batch 2
    # FSDP: the model and every global block are units; the local blocks, run in chunks, are the root's
    n_global, n_local = tiny_megabyte_config().n_global_layers, tiny_megabyte_config().n_local_layers
    assert ranks[0]["fsdp"]["sharded"] == [True] * (1 + n_global) + [False] * n_local
    assert not any(ranks[0]["ddp"]["sharded"])
    assert ranks[0]["fsdp"]["fused"] and not ranks[0]["ddp"]["fused"]  # FSDP2: the GPU's optimizer, clipping
    assert len(one["val_bpb"]) == 3
    for name in ("ddp", "fsdp"):
        for i in range(2):  # after 2 and 4 steps
            assert ranks[0][name]["val_bytes"][i] + ranks[1][name]["val_bytes"][i] == one["val_bytes"][i] == 1950
            assert ranks[0][name]["val_bpb"][i] == ranks[1][name]["val_bpb"][i]  # synced over the processes
            assert ranks[0][name]["val_bpb"][i] == pytest.approx(one["val_bpb"][i], abs=1e-6)
        # Their checkpoints load in one process and give the same test bpb and bits of every test byte
        assert single[name]["test_bpb"] == pytest.approx(ranks[0][name]["test_bpb"], abs=1e-6)
        bits, single_bits = np.load(two / name / "bits.npy"), np.load(tmp_path / name / "bits.npy")
        assert bits.shape == single_bits.shape == (len(data.splits["test"]),)
        np.testing.assert_allclose(bits, single_bits, rtol=1e-5, atol=1e-5)
        # Rank zero logged the samples after each validation: those of the weights in the checkpoint at step 4
        texts = sample_texts(two / name / "logs" / "version_0")
        assert sorted(texts) == ["samples/text/0/text_summary", "samples/text/1/text_summary"]
        for i, tag in enumerate(sorted(texts)):
            assert [step for step, _ in texts[tag]] == [2, 4]
            assert as_code_block(single[name]["samples"][i]) in texts[tag][1][1]
        # Training resumed from it in one process of batch 4 (16 windows of the pass trained): steps 5
        # and 6 train on the windows of the single process's, from the same weights and optimizer state
        resumed = single[name]["resumed"]
        assert resumed.train == one["train"][4:6]
        assert resumed.val_bpb[-1] == pytest.approx(one["val_bpb"][2], abs=1e-6)  # after step 6
    assert one["val_bpb"][1] < one["val_bpb"][0]  # it trained

    # A NaN loss in process 1 alone: both processes skip the step (and train on), or both stop
    assert ranks[0]["skipped"] == ranks[1]["skipped"] and ranks[0]["skipped"]["finite"]
    assert ranks[0]["skipped"]["global_step"] == 3
    assert all("training loss is nan or inf at step 1 " in r["stopped"] for r in ranks)
