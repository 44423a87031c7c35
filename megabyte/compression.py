"""Lossless compression with a trained model: its next-byte probabilities drive a range coder.

A file is cut into independent chunks of ``chunk_len`` bytes (chunk i: bytes i*chunk_len .. ), coded
``batch_size`` chunks at a time. Every byte of a batch is coded with the probabilities that the model's
key/value-cached decoder gives it (``prefill`` of an empty prompt for byte 0, then ``decode_step``), one
step for all the batch's chunks at once; the batch's bytes go into one range-coder stream, step by step
and chunk by chunk within a step.

Bit-exact by construction: the encoder and the decoder run the same function (``_code_batch``) over
the same batches, so every probability comes from the same kernels on tensors of the same shapes,
with the same float32 matmul precision (the header records it). The encoder feeds each step the byte
it knows (teacher forcing), the decoder the byte it has just decoded: the same values. It never uses
the model's parallel forward pass, whose different kernels give probabilities that differ in the last
bits. What this cannot promise is the same floats on other hardware or software (docs/compression.md).

The coder is ``constriction``'s range coder (``constriction.stream.queue``) with its ``Categorical``
model: it quantises each float32 distribution to integer frequencies of 24-bit precision in which every
byte keeps a frequency of at least 1, so nothing is ever uncodable, and it is deterministic in the
floats it is given.

File layout (all integers little-endian)::

    magic "MBYZ" | format version u8 | mode u8 | model hash 16 bytes | length u64 | CRC32 u32
    | output length u64 | output CRC32 u32 | chunk_len u32 | batch_size u32 | matmul precision u8
    | provenance length u16 | provenance (UTF-8) | streams u32 | words of each stream u32 ...
    | header CRC32 u32 | the streams' 32-bit words

``length`` / ``CRC32`` are those of the coded bytes, ``output length`` / ``output CRC32`` those of what
``decompress`` returns: the same in ``raw`` mode; in ``medium`` mode the coded bytes are the medium's
content (an image's pixels, audio samples) and the output is the medium's file the DataModule's ``save``
writes from them. The provenance (device, torch, constriction, threads) is only quoted when a file
fails its check after decoding.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import struct
import tempfile
import weakref
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megabyte.config import VOCAB_SIZE, config_to_dict
from megabyte.generation import GraphedSteps
from megabyte.model import ByteModel

log = logging.getLogger(__name__)

MAGIC = b"MBYZ"
FORMAT_VERSION = 1
RAW, MEDIUM = 0, 1
MODES = ("raw", "medium")
PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's values
DEFAULT_BATCH_SIZE = 64

_FIXED = struct.Struct("<4sBB16sQIQIIIBH")  # magic .. provenance length
_U32 = struct.Struct("<I")

Progress = Callable[[int], None]
"""Called with the number of bytes coded since its last call."""


@dataclasses.dataclass(frozen=True)
class Header:
    """What a compressed file says about itself (``read_header``)."""

    mode: str
    """"raw": the bytes as they are; "medium": the medium's content (pixels, samples), written back as its file."""
    model_hash: bytes
    """16 bytes: ``model_hash`` of the model that compressed it."""
    length: int
    """Bytes coded."""
    crc32: int
    """CRC32 of the bytes coded."""
    output_length: int
    """Bytes ``decompress`` returns (``length`` in raw mode)."""
    output_crc32: int
    chunk_len: int
    batch_size: int
    matmul_precision: str
    provenance: str
    """Where it was compressed: device, torch and constriction versions, CPU threads."""
    stream_words: tuple[int, ...]
    """32-bit words of each batch's range-coder stream."""
    size: int
    """Bytes of the header itself; the streams follow."""


# -- what both sides share ---------------------------------------------------------------------------


def coding_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, 256) -> float32 (B, 256) probabilities, the coder's input. Encoder and decoder reach it
    only through ``_BatchSteps``: one definition, so both quantise the same floats."""
    return torch.softmax(logits.float(), dim=-1)


_HASHES: "weakref.WeakKeyDictionary[ByteModel, tuple[Any, bytes]]" = weakref.WeakKeyDictionary()


def model_hash(model: ByteModel, data: dict[str, Any] | None = None) -> bytes:
    """sha256 (first 16 bytes) of the architecture, every weight's name, dtype, shape and bytes, and the
    data's class and format options (what the medium's bytes mean): any change to what the model computes
    or to the medium's codec changes it.

    Kept per model while no weight is replaced or written in place (its storage and version counter
    unchanged: an optimizer step, ``load_state_dict`` and ``.to(dtype)`` all change one), so a model's
    weights are read once, not at every call."""
    state = model.state_dict()
    key = (json.dumps(data, sort_keys=True, default=str), tuple((k, t.data_ptr(), t._version, t.dtype, t.device) for k, t in state.items()))
    cached = _HASHES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256(json.dumps(config_to_dict(model.config), sort_keys=True).encode())
    if data is not None:
        digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    _HASHES[model] = (key, digest.digest()[:16])
    return _HASHES[model][1]


def provenance(device: torch.device) -> str:
    """Where coding runs: the device (a CPU's thread count), torch, CUDA and constriction versions."""
    from importlib.metadata import version

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, constriction {version('constriction')}"


def check_weights(model: ByteModel) -> None:
    """Refuse half-precision weights on a GPU: there a bfloat16 model's decoder did not reproduce its
    encoder's probabilities (a 1 MB round trip failed, benchmarks/RESULTS.md), float32 ones did."""
    weights = next(model.parameters())
    if weights.device.type == "cuda" and weights.dtype != torch.float32:
        raise ValueError(
            f"compression on a GPU needs float32 weights, the model's are {str(weights.dtype).removeprefix('torch.')}: "
            "load it without a dtype (or with dtype float32)"
        )


def _batches(n_bytes: int, chunk_len: int, batch_size: int) -> list[list[int]]:
    """The chunk lengths of each batch: chunks of ``chunk_len`` bytes (the last one shorter), ``batch_size``
    of them a batch (the last batch fewer). A function of the header's fields alone."""
    lengths = [min(chunk_len, n_bytes - start) for start in range(0, n_bytes, chunk_len)]
    return [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]


class _BatchSteps:
    """The decoding steps of one batch of ``rows`` independent chunks, each from its first byte.

    ``probabilities()`` is the coder's input for the byte each row reads next; ``advance(t, byte)`` feeds
    every row its byte t - 1 and computes the probabilities of byte t. On a GPU each kind of step runs
    eagerly once, then is captured as a CUDA graph per kind and cache window and replayed (as
    ``megabyte.generation`` does): the same
    kernels on the same buffers, one launch. The schedule depends on the batch alone, so the encoder and
    the decoder run identical work.
    """

    def __init__(self, model: ByteModel, rows: int, steps: int, device: torch.device) -> None:
        self.model = model
        self.cuda_graphs = device.type == "cuda"
        pinned = self.cuda_graphs
        self.byte = torch.zeros(rows, dtype=torch.long, device=device)  # (rows,) the byte the next step reads
        self.host_byte = torch.zeros(rows, dtype=torch.long, pin_memory=pinned)
        self.host = torch.empty(rows, VOCAB_SIZE, dtype=torch.float32, pin_memory=pinned)
        # caches of the batch's longest chunk (steps bytes), not of max_seq_len
        logits, self.state = model.prefill(torch.zeros(rows, 0, dtype=torch.long, device=device), max_len=steps)  # byte 0
        self.probs = coding_probabilities(logits)  # (rows, 256) on the device, overwritten by every step
        self.replay = GraphedSteps(self.cuda_graphs)

    def _step(self, kind: Any) -> None:
        self.probs.copy_(coding_probabilities(self.model.decode_step(self.byte, kind, self.state)))

    def probabilities(self) -> np.ndarray:
        """float32 (rows, 256): one device -> host copy (which waits for the step)."""
        self.host.copy_(self.probs)
        return self.host.numpy()

    def advance(self, t: int, byte: np.ndarray) -> None:
        """byte: int (rows,), every row's byte t - 1 -> the probabilities of byte t."""
        self.host_byte.numpy()[:] = byte
        # The previous probabilities() copy has waited for the device: the pinned buffer is free to refill.
        self.byte.copy_(self.host_byte, non_blocking=self.cuda_graphs)
        kind = self.model.step_kind(t)
        # Attention over a window of the caches that holds their filled part (ByteModel.narrow_attention):
        # the window depends on t alone, so both sides read the same windows; one graph per kind and window.
        self.replay((kind, self.model.narrow_attention(self.state, t)), functools.partial(self._step, kind))


class _Precision:
    """Run with ``torch.set_float32_matmul_precision(precision)``, autocast off, in inference mode, and
    put the precision back: the header records it so the decoder computes as the encoder did."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision, self.device = precision, device

    def __enter__(self) -> None:
        self.saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)
        self.contexts = [torch.inference_mode(), torch.autocast(self.device.type, enabled=False)]
        for context in self.contexts:
            context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for context in reversed(self.contexts):
            context.__exit__(*exc)
        torch.set_float32_matmul_precision(self.saved)


def _code_batch(
    model: ByteModel, lengths: list[int], code: Callable[[int, np.ndarray], np.ndarray], progress: Progress | None
) -> None:
    """Run one batch of chunks (``lengths``: their lengths, non-increasing) through the decoder, byte by byte.

    ``code(t, probs)``: probs float32 (k, 256) of byte t of the k chunks that have one -> those bytes,
    int (k,): the encoder codes the bytes it knows and returns them, the decoder decodes them. Rows past
    their chunk's end read byte 0, on both sides alike.
    """
    rows, steps = len(lengths), max(lengths)
    device = next(model.parameters()).device
    batch = _BatchSteps(model, rows, steps, device)
    byte = np.zeros(rows, dtype=np.int64)
    done = 0
    for t in range(steps):
        k = rows if t < lengths[-1] else rows - 1  # only a file's last chunk is shorter, and it is the last row
        byte[:k] = code(t, batch.probabilities()[:k])
        done += k
        if progress is not None and (t % 256 == 255 or t == steps - 1):
            progress(done)
            done = 0
        if t + 1 < steps:
            batch.advance(t + 1, byte)


def _family() -> Any:
    import constriction  # its submodules are attributes of the extension module, not importable by name

    # perfect=False: the fast quantisation, deterministic; encoder and decoder must both use it.
    return constriction.stream.model.Categorical(perfect=False)


# -- media ----------------------------------------------------------------------------------------------


def _medium_bytes(datamodule: Any, data: bytes) -> bytes:
    """A file's bytes -> the medium's content as the model sees it (``encode_file``)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input"
        path.write_bytes(data)
        return datamodule.encode_file(path).numpy().tobytes()


def _medium_file(datamodule: Any, content: bytes) -> bytes:
    """The medium's content -> the bytes of the file the DataModule's ``save`` writes (PNG, WAV)."""
    with tempfile.TemporaryDirectory() as folder:
        return datamodule.save(np.frombuffer(content, dtype=np.uint8), Path(folder) / "output").read_bytes()


def choose_mode(pretrained: Any, data: bytes, medium: bool | None) -> tuple[int, bytes, bytes]:
    """(mode, the bytes to code, the bytes ``decompress`` will return).

    Text models code the bytes as they are. For an image or audio model: ``medium`` None codes the
    medium's content only where writing it back with the DataModule's ``save`` gives this very file
    (nothing lost), else the raw bytes; True codes the content of any file of the medium (decompress
    then writes the medium's file: PNG, WAV; a ValueError for a file that is not one); False the raw bytes.
    """
    if medium is False or pretrained.medium == "text":
        return RAW, data, data
    datamodule = pretrained.datamodule
    try:
        content = _medium_bytes(datamodule, data)
    except Exception as error:  # Pillow and libsndfile raise many kinds of errors on other files
        if medium:
            raise ValueError(f"not a file of the model's medium ({pretrained.medium}): {error}") from error
        log.info("coding the raw bytes: not a file of the model's medium (%s)", error)
        return RAW, data, data
    written = _medium_file(datamodule, content)
    if written == data:
        return MEDIUM, content, data
    if medium:
        return MEDIUM, content, written
    log.info("coding the raw bytes: the %s's content would not give this file back byte for byte", pretrained.medium)
    return RAW, data, data


# -- compress / decompress -------------------------------------------------------------------------------


def compress(
    pretrained: Any,
    data: bytes,
    chunk_len: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    medium: bool | None = None,
    progress: Progress | None = None,
) -> bytes:
    """``data`` -> a compressed file (bytes) that ``decompress`` with the same model turns back into it.

    chunk_len: bytes of each independent chunk, 1..max_seq_len (default max_seq_len): longer chunks give
        the model more context. batch_size: chunks coded at once (speed and memory, not size, apart from
        one stream's few bytes per batch); the decoder uses the same.
    medium: see ``choose_mode`` (None: the medium's content only where nothing is lost).
    progress: called with the bytes coded since its last call.
    """
    import constriction

    model = pretrained.model
    T = model.config.max_seq_len
    chunk_len = T if chunk_len is None else chunk_len
    if not 1 <= chunk_len <= T:
        raise ValueError(f"chunk_len must be in 1..{T} (the model's max_seq_len), got {chunk_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of chunks, got {batch_size}")
    data = bytes(data)
    check_weights(model)
    mode, content, output = choose_mode(pretrained, data, medium)
    device = next(model.parameters()).device
    precision = torch.get_float32_matmul_precision()
    symbols = np.frombuffer(content, dtype=np.uint8)
    streams: list[np.ndarray] = []
    family = _family()
    with _Precision(precision, device):
        start = 0
        for lengths in _batches(len(content), chunk_len, batch_size):
            chunks = np.zeros((len(lengths), max(lengths)), dtype=np.int32)  # (rows, steps), the last one zero-padded
            flat = symbols[start : start + sum(lengths)]
            chunks.reshape(-1)[: len(flat)] = flat
            start += sum(lengths)
            columns = np.ascontiguousarray(chunks.T)  # (steps, rows): byte t of every chunk, contiguous
            encoder = constriction.stream.queue.RangeEncoder()

            def encode(t: int, probs: np.ndarray) -> np.ndarray:
                byte = columns[t, : len(probs)]  # (k,)
                encoder.encode(byte, family, probs)
                return byte

            _code_batch(model, lengths, encode, progress)
            streams.append(encoder.get_compressed())
    header = _header(
        mode=mode, model_hash=model_hash(model, _data_format(pretrained)), content=content, output=output,
        chunk_len=chunk_len, batch_size=batch_size, precision=precision, provenance=provenance(device),
        stream_words=[len(s) for s in streams],
    )  # fmt: skip
    return header + b"".join(s.astype("<u4").tobytes() for s in streams)


def decompress(pretrained: Any, blob: bytes, progress: Progress | None = None) -> bytes:
    """A file written by ``compress`` with this model -> the original bytes (or, in medium mode with
    ``medium=True``, the medium's file). Raises one ValueError saying why for a file that is not one, is
    cut short or corrupted, or was written by another model; never returns other bytes than were
    compressed (the CRC32 of the result is checked)."""
    import constriction

    header = read_header(blob)
    model = pretrained.model
    check_weights(model)
    expected = model_hash(model, _data_format(pretrained))
    if header.model_hash != expected:
        raise ValueError(
            f"compressed with another model (its hash {header.model_hash.hex()}, this model's {expected.hex()}): "
            f"decompress with the model (checkpoint, weights dtype) that compressed it"
        )
    if header.chunk_len > model.config.max_seq_len:
        raise ValueError(f"the file's chunk_len {header.chunk_len} exceeds this model's max_seq_len {model.config.max_seq_len}")
    payload = memoryview(blob)[header.size :]
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32) if len(payload) % 4 == 0 else None
    need = 4 * sum(header.stream_words)
    if len(payload) < need:
        raise ValueError(f"truncated: {len(payload)} bytes of coded data, the header says {need}")
    if len(payload) > need or words is None:
        raise ValueError(f"{len(payload) - need} bytes more than the header says: not one whole compressed file")
    device = next(model.parameters()).device
    batches = _batches(header.length, header.chunk_len, header.batch_size)
    out = np.zeros(header.length, dtype=np.uint8)
    family = _family()
    start, offset = 0, 0
    with _Precision(header.matmul_precision, device):
        for lengths, n_words in zip(batches, header.stream_words):
            decoder = constriction.stream.queue.RangeDecoder(words[offset : offset + n_words])
            offset += n_words
            columns = np.zeros((max(lengths), len(lengths)), dtype=np.uint8)  # (steps, rows)

            def decode(t: int, probs: np.ndarray) -> np.ndarray:
                try:
                    byte = decoder.decode(family, probs)
                except Exception as error:  # the coder refuses data it could not have written
                    raise ValueError(f"corrupted: the coded data does not decode ({error})") from error
                columns[t, : len(probs)] = byte
                return byte

            _code_batch(model, lengths, decode, progress)
            n = sum(lengths)
            out[start : start + n] = columns.T.reshape(-1)[:n]  # (rows, steps) -> the chunks one after another
            start += n
    content = out.tobytes()
    if zlib.crc32(content) != header.crc32:
        here = provenance(device)
        where = "" if here == header.provenance else f"; compressed on {header.provenance}, decompressed on {here}"
        raise ValueError(
            "corrupted: the decoded bytes fail the file's CRC32 (a damaged file, or one compressed on other "
            f"hardware or software{where})"
        )
    if header.mode == "raw":
        return content
    output = _medium_file(pretrained.datamodule, content)
    if len(output) != header.output_length or zlib.crc32(output) != header.output_crc32:
        raise ValueError(
            f"the {pretrained.medium} file written from the decoded content differs from the one compressed "
            f"(another version of the library that writes {pretrained.medium} files?)"
        )
    return output


def _data_format(pretrained: Any) -> dict[str, Any]:
    """The data's class and the options that decide what its bytes mean (``FORMAT_OPTIONS``)."""
    data = pretrained.data
    cls = type(pretrained.datamodule)
    return {"class_path": data["class_path"], **cls.data_format(dict(data.get("init_args") or {}))}


def _header(
    mode: int, model_hash: bytes, content: bytes, output: bytes, chunk_len: int, batch_size: int, precision: str,
    provenance: str, stream_words: list[int],
) -> bytes:  # fmt: skip
    prov = provenance.encode()[:65535]
    fixed = _FIXED.pack(
        MAGIC, FORMAT_VERSION, mode, model_hash, len(content), zlib.crc32(content), len(output),
        zlib.crc32(output), chunk_len, batch_size, PRECISIONS.index(precision), len(prov),
    )  # fmt: skip
    head = fixed + prov + _U32.pack(len(stream_words)) + struct.pack(f"<{len(stream_words)}I", *stream_words)
    return head + _U32.pack(zlib.crc32(head))


def read_header(blob: bytes) -> Header:
    """The header of a compressed file; a ValueError saying why for what is not one (bad magic, a newer
    format version, cut short, a damaged header)."""
    blob = memoryview(blob)
    if len(blob) < len(MAGIC) or bytes(blob[: len(MAGIC)]) != MAGIC:
        raise ValueError("not a file written by megabyte compress (bad magic)")
    if len(blob) < _FIXED.size:
        raise ValueError(f"truncated: {len(blob)} bytes, shorter than a header")
    _, version, mode, digest, length, crc, out_length, out_crc, chunk_len, batch_size, precision, n_prov = _FIXED.unpack(
        blob[: _FIXED.size]
    )
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version}: this version of megabyte reads version {FORMAT_VERSION}")
    at = _FIXED.size + n_prov
    if len(blob) < at + 4:
        raise ValueError(f"truncated: {len(blob)} bytes, shorter than its header")
    (n_streams,) = _U32.unpack(blob[at : at + 4])
    end = at + 4 + 4 * n_streams
    if len(blob) < end + 4:
        raise ValueError(f"truncated: {len(blob)} bytes, shorter than its header ({end + 4})")
    (stored,) = _U32.unpack(blob[end : end + 4])
    if zlib.crc32(blob[:end]) != stored:
        raise ValueError("corrupted: the header fails its CRC32")
    if mode >= len(MODES) or precision >= len(PRECISIONS) or chunk_len < 1 or batch_size < 1:
        raise ValueError("corrupted: the header holds impossible values")
    if n_streams != len(_batches(length, chunk_len, batch_size)):
        raise ValueError("corrupted: the header's number of streams does not fit its length")
    return Header(
        mode=MODES[mode], model_hash=bytes(digest), length=length, crc32=crc, output_length=out_length,
        output_crc32=out_crc, chunk_len=chunk_len, batch_size=batch_size, matmul_precision=PRECISIONS[precision],
        provenance=bytes(blob[_FIXED.size : at]).decode(errors="replace"),
        stream_words=struct.unpack(f"<{n_streams}I", blob[at + 4 : end]), size=end + 4,
    )  # fmt: skip


def coded_bits(pretrained: Any, data: bytes, chunk_len: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """The sum over the bytes of ``data`` (coded as they are) of -log2 p(byte) under the very
    probabilities ``compress`` gives the coder (the same decode steps, chunks and batches): what an ideal
    coder would spend, in bits. The range coder's output is this plus its quantisation and a few bytes a
    stream."""
    model = pretrained.model
    chunk_len = model.config.max_seq_len if chunk_len is None else chunk_len
    symbols = np.frombuffer(bytes(data), dtype=np.uint8)
    total = 0.0
    device = next(model.parameters()).device
    with _Precision(torch.get_float32_matmul_precision(), device):
        start = 0
        for lengths in _batches(len(symbols), chunk_len, batch_size):
            rows = np.arange(len(lengths))
            starts = start + rows * chunk_len
            start += sum(lengths)

            def score(t: int, probs: np.ndarray) -> np.ndarray:
                nonlocal total
                byte = symbols[starts[: len(probs)] + t].astype(np.int64)
                p = probs.astype(np.float64)
                total -= float(np.log2(p[np.arange(len(byte)), byte] / p.sum(axis=1)).sum())
                return byte

            _code_batch(model, lengths, score, None)
    return total
