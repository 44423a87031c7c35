"""Sampling bytes one at a time from a model's key/value-cached decoder (``prefill`` / ``decode_step``).

On a GPU each step (sample a byte, write it, run the decoder for the next one) is captured once as a
CUDA graph per step kind and cache window and then replayed: one launch per byte instead of hundreds,
so the speed is the GPU's, not the Python interpreter's. Every position of a step lives on the device
(the caches' lengths, the model's position counter, the index of the byte written), so a graph stays
valid for every step of its kind and window. The window (``ByteModel.narrow_attention``, a few lengths
chosen on the host) lets a step attend over the filled part of the key/value caches rather than over
their whole buffers: at batch 64 the keys and values read, not the weights, bound a step. Sampling uses the Gumbel-max trick with uniform noise drawn up front: the
same bytes with and without graphs, for a given generator.
"""

import copy
import functools
from collections.abc import Callable

import torch

from megabyte.config import VOCAB_SIZE
from megabyte.model import ByteModel, StepKind
from megabyte.parallelize import inductor_options


def sample_next_byte(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, 256) -> LongTensor (B,) of sampled bytes.

    ``temperature`` 0 is greedy (argmax); otherwise logits / temperature are restricted to the
    ``top_k`` most likely bytes and to the smallest set whose probability reaches ``top_p``, and a
    byte is drawn from their softmax as argmax(logits + Gumbel noise). ``noise``: uniform [0, 1)
    (B, 256), drawn from ``generator`` when not given.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < VOCAB_SIZE:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, 256)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a byte when the more likely ones already reach top_p (the most likely always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if noise is None:
        noise = torch.rand(logits.shape, generator=generator, device=logits.device)
    return (logits - torch.log(-torch.log(noise))).argmax(dim=-1)  # Gumbel-max: a softmax sample


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:  # NaN too
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= VOCAB_SIZE:
        raise ValueError(f"top_k must be in 1..{VOCAB_SIZE} or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def generation_step(
    model: ByteModel,
    state: object,
    kind: StepKind,
    logits: torch.Tensor,
    x: torch.Tensor,
    noise: torch.Tensor | None,
    drawn: torch.Tensor,
    written: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    """One step of ``generate``, all on the device: sample a byte from ``logits`` (B, 256) with noise row
    ``drawn``, write it at ``written`` in x (B, total), count both, then put the next byte's logits into
    ``logits`` (a step of ``kind``)."""
    step_noise = None if noise is None else noise.index_select(0, drawn).squeeze(0)  # (B, 256)
    byte = sample_next_byte(logits, temperature, top_k, top_p, noise=step_noise)  # (B,)
    x.index_copy_(1, written.view(1), byte[:, None])
    drawn.add_(1)
    written.add_(1)
    logits.copy_(model.decode_step(byte, kind, state))


@functools.cache
def compiled_generation_step() -> Callable[..., None]:
    """``generation_step`` through torch.compile, made once per process: its compilations (one per kind of
    step, batch size and sampling setting) are reused by every later ``generate(compile=True)``."""
    compiled = torch.compile(generation_step, fullgraph=True, dynamic=False, options=inductor_options("default"))

    def step(*args) -> None:
        # Compilations add up over models, kinds, batch sizes and sampling settings: more than dynamo's
        # default of 8, after which it would silently run the step uncompiled.
        with torch._dynamo.config.patch(recompile_limit=64):
            compiled(*args)

    return step


class GraphedSteps:
    """Run decoding steps that are the same device code for one key (a step kind and cache window): the
    first ``eager_runs`` of a key eagerly (which also compiles a compiled step and initialises the kernels
    a capture needs), then, with ``cuda_graphs``, captured once as a CUDA graph and replayed."""

    def __init__(self, cuda_graphs: bool, eager_runs: int = 1) -> None:
        self.cuda_graphs, self.eager_runs = cuda_graphs, eager_runs
        self.runs: dict[object, int] = {}
        self.graphs: dict[object, torch.cuda.CUDAGraph] = {}

    def __call__(self, key: object, step: Callable[[], None]) -> None:
        self.runs[key] = self.runs.get(key, 0) + 1
        if not self.cuda_graphs or self.runs[key] <= self.eager_runs:
            step()
        elif key in self.graphs:
            self.graphs[key].replay()
        else:  # capture records the step without running it: run it by replaying
            self.graphs[key] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graphs[key]):
                step()
            self.graphs[key].replay()


@torch.no_grad()
def generate(
    model: ByteModel,
    prompt: torch.Tensor,
    max_new_bytes: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    cuda_graphs: bool | None = None,
    compile: bool = False,
    full_cache: bool = False,
) -> torch.Tensor:
    """Continue ``prompt`` by ``max_new_bytes`` bytes sampled from ``model`` (MegaByte or ByteTransformer).

    prompt: LongTensor (B, n), values 0..255 (n may be 0); n + max_new_bytes <= max_seq_len.
    temperature: 0 is greedy decoding; top_k / top_p restrict sampling.
    generator: the random generator of the sampling, for reproducible samples.
    cuda_graphs: replay each decoding step as a CUDA graph; None: on a GPU.
    compile: fuse each kind of decoding step with ``torch.compile`` (about a minute, once per
        process, kind of step, batch size and sampling setting: pays for long or repeated generations).
    full_cache: attend over the whole key/value buffers (``max_seq_len`` positions) at every step
        rather than over a window that holds the filled part: the same bytes, slower; for measuring.
    Under autocast (e.g. Lightning's bf16-mixed), a copy of the model in autocast's dtype decodes.
    Returns LongTensor (B, n + max_new_bytes): the prompt followed by the new bytes.
    The model runs in eval mode (no dropout) and is put back in its previous mode.
    """
    if prompt.dim() != 2 or prompt.dtype != torch.long:
        raise ValueError(f"expected prompt LongTensor (B, n), got {prompt.dtype} of shape {tuple(prompt.shape)}")
    if max_new_bytes < 0:
        raise ValueError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
    check_sampling(temperature, top_k, top_p)
    if prompt.numel() and not 0 <= prompt.min() <= prompt.max() < VOCAB_SIZE:
        raise ValueError(f"prompt bytes must be in 0..{VOCAB_SIZE - 1}, got {prompt.min()}..{prompt.max()}")
    B, n = prompt.shape
    total = n + max_new_bytes
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({n} bytes) + max_new_bytes ({max_new_bytes}) exceeds max_seq_len {model.config.max_seq_len}"
        )
    x = torch.cat([prompt, prompt.new_zeros(B, max_new_bytes)], dim=1)  # (B, total)
    if max_new_bytes == 0:
        return x
    device = prompt.device
    if torch.is_autocast_enabled(device.type):
        # Decode a copy of the model in autocast's dtype, autocast off: autocast would cast every weight
        # again at every step (its cast cache is off inside CUDA graphs).
        half = copy.deepcopy(model).to(torch.get_autocast_dtype(device.type))
        with torch.autocast(device.type, enabled=False):
            return generate(
                half, prompt, max_new_bytes, temperature, top_k, top_p, generator, cuda_graphs, compile, full_cache
            )
    use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    noise = None  # uniform noise of every sampled byte, drawn up front (B, 256) per step
    if temperature > 0:
        noise = torch.rand(max_new_bytes, B, VOCAB_SIZE, generator=generator, device=device)
    step_fn = generation_step
    if compile:  # one compilation serves every length of prompt and of generation
        step_fn = compiled_generation_step()
        torch._dynamo.maybe_mark_dynamic(x, 1)
        if noise is not None:
            torch._dynamo.maybe_mark_dynamic(noise, 0)
    was_training = model.training
    model.eval()
    try:
        logits, state = model.prefill(prompt)  # logits (B, 256) of byte n
        drawn = torch.zeros((), dtype=torch.long, device=device)  # bytes sampled so far
        written = torch.tensor(n, device=device)  # where the next sampled byte goes in x
        # Steps of one kind run the same device code whatever t is, up to the window of the caches
        # they attend over (a few lengths, chosen here on the host where t is known): one function
        # (compiled or not, a compilation serving every window) per kind and one CUDA graph per kind
        # and window, made after that pair ran eagerly (which also compiles the step and initialises
        # the kernels a capture needs).
        steps: dict[StepKind, Callable[[], None]] = {}
        replay = GraphedSteps(use_graphs, eager_runs=2 if compile else 1)
        for t in range(n, total - 1):
            kind = model.step_kind(t + 1)
            key = (kind, None if full_cache else model.narrow_attention(state, t + 1))
            if kind not in steps:
                steps[kind] = functools.partial(
                    step_fn, model, state, kind, logits, x, noise, drawn, written, temperature, top_k, top_p
                )
            replay(key, steps[kind])
        last_noise = None if noise is None else noise[-1]
        x[:, total - 1] = sample_next_byte(logits, temperature, top_k, top_p, noise=last_noise)
    finally:
        model.train(was_training)
    return x
