"""Windows over a byte stream: random ones for training, consecutive ones for evaluation.

Every modality ends up as a 1-D uint8 array (usually a memory map); these datasets cut it
into model inputs. A batch is ``(x, mask)``: ``x`` uint8 (B, T) bytes and ``mask`` bool
(B, T), False on the padding that fills up a short last window.

Under several processes (DDP, FSDP) the windows are dealt out like cards: process r of R takes
items r, r + R, r + 2R, ... of the training pass or of the evaluation windows. The samplers here
are ``DistributedSampler``s, which Lightning leaves as they are (it wraps any other sampler in one).
"""

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


class RandomWindows(Dataset):
    """Every window of ``seq_len`` bytes that fits in ``data`` and starts at a multiple of ``step``;
    window ``i`` starts at byte ``i * step``.

    Sample it with a ``ResumableSampler`` to get random, reproducible training windows. A
    ``step`` of 2 keeps 16-bit audio samples whole.
    """

    def __init__(self, data: np.ndarray, seq_len: int, step: int = 1) -> None:
        if len(data) < seq_len:
            raise ValueError(f"{len(data)} bytes hold no window of seq_len {seq_len}")
        if step < 1:
            raise ValueError(f"step must be a positive integer, got {step}")
        self.data = data
        self.seq_len = seq_len
        self.step = step

    def __len__(self) -> int:
        return (len(self.data) - self.seq_len) // self.step + 1

    def __getitem__(self, index: int) -> torch.Tensor:
        """-> uint8 (seq_len,), the bytes [index * step, index * step + seq_len)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.step
        return torch.from_numpy(np.array(self.data[start : start + self.seq_len]))


class EvalWindows(Dataset):
    """Consecutive windows ``[i * seq_len, (i + 1) * seq_len)`` that cover ``data`` exactly once.

    The last window is shorter when ``len(data)`` is not a multiple of ``seq_len``.
    """

    def __init__(self, data: np.ndarray, seq_len: int) -> None:
        if len(data) == 0:
            raise ValueError("cannot evaluate on an empty split")
        self.data = data
        self.seq_len = seq_len

    def __len__(self) -> int:
        return -(-len(self.data) // self.seq_len)  # ceil

    def __getitem__(self, index: int) -> torch.Tensor:
        """-> uint8 (L,), L = seq_len except possibly for the last window."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        return torch.from_numpy(np.array(self.data[start : start + self.seq_len]))


class PaddedWindows(Dataset):
    """``dataset`` (uint8 windows) followed by empty windows up to a multiple of ``multiple`` items.

    For an evaluation shared by ``multiple`` processes: torch's ``DistributedSampler`` (without
    shuffling) deals such a dataset out with no window repeated (it would repeat some to even out
    the shares, counting their bytes twice) and every process gets as many items, hence as many
    batches: FSDP gathers the weights in every forward pass, so a process with one batch more would
    wait forever. An empty window is all padding: it adds no byte to the metrics.
    """

    def __init__(self, dataset: Dataset, multiple: int) -> None:
        self.dataset = dataset
        self.total = -(-len(dataset) // multiple) * multiple  # len(dataset) rounded up

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> torch.Tensor:
        """-> uint8 (L,): window ``index`` of ``dataset``, or (0,) past its end."""
        if not 0 <= index < self.total:
            raise IndexError(index)
        return self.dataset[index] if index < len(self.dataset) else torch.zeros(0, dtype=torch.uint8)


def pad_collate(windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack windows into ``(x, mask)``: x uint8 (B, T) zero-padded at the end, mask bool (B, T).
    A batch of empty windows (``PaddedWindows``) is one masked byte long."""
    T = max(1, max(len(w) for w in windows))
    x = torch.zeros(len(windows), T, dtype=torch.uint8)
    mask = torch.zeros(len(windows), T, dtype=torch.bool)
    for i, w in enumerate(windows):
        x[i, : len(w)] = w
        mask[i, : len(w)] = True
    return x, mask


class ResumableSampler(DistributedSampler):
    """Random indices into a dataset of ``n`` items, ``num_samples`` per pass, in an order that is a pure
    function of (``seed``, pass number): drawn with replacement, or a permutation (then
    ``num_samples <= n``). Every ``iter()`` starts the next pass, from pass ``epoch`` on; ``start`` skips
    the first ``start`` positions of that first pass (those a checkpoint's run trained on, with however
    many processes), so a run resumed mid-pass sees exactly the windows it had not trained on yet.

    ``num_replicas`` processes share every pass: process ``rank`` takes positions rank, rank +
    num_replicas, ... (of the first pass: start + rank, ...), as many as every process gets (the
    pass's last few, fewer than num_replicas, are left out). So one step of all the processes, batch B
    each, trains on the next num_replicas x B positions, the windows of one step of a single process
    with batch num_replicas x B, and a pass is used up the same way whatever the number of processes.
    A ``DistributedSampler`` so that Lightning uses it as it is: it would wrap any other sampler in one,
    which shuffles the pass again and cannot resume it.
    """

    def __init__(
        self, n: int, num_samples: int, seed: int, replacement: bool, epoch: int = 0, start: int = 0,
        num_replicas: int = 1, rank: int = 0,
    ) -> None:  # fmt: skip
        if n < 1 or num_samples < num_replicas:
            raise ValueError(
                f"need n >= 1 and num_samples >= num_replicas, got n={n}, num_samples={num_samples}, "
                f"num_replicas={num_replicas}"
            )
        if not replacement and num_samples > n:
            raise ValueError(f"a permutation of {n} items has no {num_samples} samples; use replacement")
        if not 0 <= start <= num_samples:
            raise ValueError(f"start must be in 0..{num_samples}, got {start}")
        # The pass's positions 0..num_samples-1, shared out: self.num_samples is this process's share.
        super().__init__(range(num_samples), num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.n, self.replacement = n, replacement
        self.first_epoch, self.start = epoch, start
        self.next_epoch = epoch
        self.epoch: int | None = None
        """The pass of the latest ``iter()``; None before the first."""

    def skipped(self, epoch: int) -> int:
        """Positions of pass ``epoch`` (all processes) trained on before this sampler: ``start`` for its
        first pass, 0 for the others."""
        return self.start if epoch == self.first_epoch else 0

    def share(self, epoch: int) -> int:
        """How many items of pass ``epoch`` this process takes: ``len(self)``, less of the first pass."""
        return (len(self.dataset) - self.skipped(epoch)) // self.num_replicas

    def indices(self, epoch: int) -> np.ndarray:
        """int64 (share(epoch),): this process's items of pass ``epoch``, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        size = len(self.dataset)  # the whole pass, all processes
        order = rng.integers(self.n, size=size) if self.replacement else rng.permutation(self.n)[:size]
        rest = order[self.skipped(epoch) :]
        return rest[self.rank : self.share(epoch) * self.num_replicas : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        epoch = self.next_epoch
        self.epoch, self.next_epoch = epoch, epoch + 1
        return iter(self.indices(epoch).tolist())

    def __len__(self) -> int:
        """A whole share of a pass, also when resuming: Lightning counts the batches skipped (the
        DataModule sets its count to them, ``ByteDataModule._count_skipped_batches``)."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Ignored. Lightning calls it with its epoch count; the pass number here is the sampler's own
        (``epoch``, then one more every ``iter()``), which the DataModule keeps in checkpoints."""
