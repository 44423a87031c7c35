"""A trained model from Python: ``megabyte.load(path)`` -> a ``Pretrained`` that generates, scores,
compresses and decompresses bytes, and decodes them to its medium.

``path`` is a Lightning checkpoint (``.ckpt``, as ``fit`` writes), a folder written by ``export``:
``config.json`` (the architecture and the data options) and ``model.safetensors`` (the weights alone), or
such a folder on the Hugging Face Hub, ``hf://owner/name`` (``Pretrained.push_to_hub`` uploads one; both
need the optional ``huggingface_hub``: ``pip install "megabyte-lightning[hub]"``).
The medium's codec is the DataModule the model was trained with, reached through the class path that
the checkpoint stores (``datamodules.TextDataModule``, ...): this module imports no DataModule itself.
"""

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from megabyte.bits import byte_bits, strided_bits
from megabyte.config import MegaByteConfig, ModelConfig, config_from_dict, config_to_dict
from megabyte.generation import generate
from megabyte.model import ByteModel, build_model

FORMAT = "megabyte-lightning"
FORMAT_VERSION = 1
HUB = "hf://"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Prompt = bytes | bytearray | str | Path


class Pretrained:
    """A trained model (``model``: MegaByte or ByteTransformer, in eval mode) and the data options it
    was trained with (``data``: ``{"class_path": ..., "init_args": {...}}``), which give its codec."""

    def __init__(self, model: ByteModel, data: dict[str, Any]) -> None:
        self.model = model.eval()
        self.data = data
        self._datamodule = None

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return (
            f"Pretrained({type(self.model).__name__}, {params / 1e6:.1f} M parameters, "
            f"max_seq_len {self.config.max_seq_len}, data {self.data.get('class_path')}, device {self.device})"
        )

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def datamodule(self) -> Any:
        """The DataModule of the model's medium, built from the stored options (no data is read)."""
        if self._datamodule is None:
            module, _, name = self.data["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            self._datamodule = cls(**self.data.get("init_args", {}))
        return self._datamodule

    @property
    def medium(self) -> str:
        """"text", "image" or "audio": what ``decode`` returns."""
        return self.datamodule.media

    def to(self, device: str | torch.device) -> "Pretrained":
        self.model.to(device)
        return self

    # -- bytes in ---------------------------------------------------------------------------------

    def encode(self, data: Prompt) -> torch.Tensor:
        """bytes as they are, a str as UTF-8, a ``Path`` as a file of the model's medium (an image or a
        recording is decoded and encoded as the DataModule does; other files as their bytes) ->
        uint8 (L,)."""
        if isinstance(data, Path):
            return self.datamodule.encode_file(data)
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"expected bytes, str or a Path, got {type(data).__name__}")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)

    # -- what the model does ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompt: Prompt = b"",
        max_new_bytes: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        compile: bool = False,
    ) -> bytes:
        """The prompt followed by ``max_new_bytes`` sampled bytes (``megabyte.generate``).

        temperature 0 is greedy decoding; ``seed`` makes sampling reproducible on one device. A prompt
        that leaves no room (prompt + max_new_bytes > max_seq_len) keeps what the medium keeps: its last
        bytes for text, the top of an image, whole audio samples.
        """
        room = self.config.max_seq_len - max_new_bytes
        if max_new_bytes < 0 or room < 0:
            raise ValueError(f"max_new_bytes must be 0..{self.config.max_seq_len} (the model's max_seq_len), got {max_new_bytes}")
        prompt_bytes = self.encode(prompt)
        if len(prompt_bytes) > room:
            if not isinstance(prompt, Path):
                raise ValueError(
                    f"the prompt ({len(prompt_bytes)} bytes) and max_new_bytes {max_new_bytes} exceed the model's "
                    f"max_seq_len {self.config.max_seq_len}: shorten the prompt or lower max_new_bytes"
                )
            prompt_bytes = self.datamodule.cut_prompt(prompt_bytes, room)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        x = prompt_bytes.long().to(self.device)[None]  # (1, n)
        out = generate(self.model, x, max_new_bytes, temperature, top_k, top_p, generator, compile=compile)
        return bytes(out[0].to(torch.uint8).cpu().tolist())

    def decode(self, data: bytes) -> Any:
        """Bytes -> the medium: a str (text), a PIL image (image), (waveform float32 (N,), sample rate)
        (audio). Never raises on byte content."""
        decoded = self.datamodule.decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if self.medium == "image":
            from PIL import Image

            pixels = decoded.permute(1, 2, 0).numpy()  # (H, W, C)
            return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        return decoded

    def save(self, data: bytes, path: str | Path) -> Path:
        """Write bytes as a file of the medium (``.txt``, ``.png``, ``.wav``); returns the path."""
        return self.datamodule.save(torch.frombuffer(bytearray(data), dtype=torch.uint8), path)

    @torch.inference_mode()
    def bits(self, data: Prompt, strided: bool = False, batch_size: int = 8) -> float:
        """Bits per byte the model spends on ``data`` (as ``encode`` reads it): windows of max_seq_len
        bytes, each read from its own start (as ``test`` scores a split); ``strided`` uses the paper's
        strided inference (MegaByte). 8.0 is a uniform guess."""
        x = self.encode(data).long()
        if len(x) == 0:
            raise ValueError("no bytes to score")
        T = self.config.max_seq_len
        total = 0.0
        for start in range(0, len(x), T * batch_size):
            windows = [x[i : i + T] for i in range(start, min(start + T * batch_size, len(x)), T)]
            batch = torch.nn.utils.rnn.pad_sequence(windows, batch_first=True).to(self.device)  # (B, T')
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(w), dtype=torch.bool) for w in windows], batch_first=True)

            def one_pass(x: torch.Tensor) -> torch.Tensor:
                return byte_bits(self.model(x), x)

            if strided and isinstance(self.config, MegaByteConfig):
                bits = strided_bits(one_pass, batch, self.config.patch_size)
            else:
                bits = one_pass(batch)
            total += bits.double().cpu()[mask].sum().item()
        return total / len(x)

    # -- compression ------------------------------------------------------------------------------

    def compress(
        self, data: bytes, chunk_len: int | None = None, batch_size: int = 64, medium: bool | None = None,
        progress: Any = None,
    ) -> bytes:  # fmt: skip
        """``data`` (a file's bytes) -> a compressed file that ``decompress`` with this model turns back
        into it, bit for bit, on the same hardware and software (``megabyte.compression.compress``).

        chunk_len: bytes of each independent chunk (default max_seq_len); batch_size: chunks coded at once.
        medium: for an image or audio model, None codes the medium's content (pixels, samples) where that
        loses nothing of the file, else its raw bytes; True always codes the content (decompress then
        gives the medium's file, PNG or WAV); False always the raw bytes. Text is coded as it is.
        """
        from megabyte.compression import compress

        return compress(self, data, chunk_len, batch_size, medium, progress)

    def decompress(self, blob: bytes, progress: Any = None) -> bytes:
        """A file written by ``compress`` with this model -> the bytes compressed; a ValueError saying why
        for another model's file, a truncated or a corrupted one (``megabyte.compression.decompress``)."""
        from megabyte.compression import decompress

        return decompress(self, blob, progress)

    # -- sharing ----------------------------------------------------------------------------------

    def export(self, folder: str | Path, dtype: str | None = None) -> Path:
        """Write ``folder/config.json`` and ``folder/model.safetensors`` (weights alone, in ``dtype``:
        "float32", "bfloat16" or "float16"; None keeps the model's). ``load(folder)`` reads it back."""
        from safetensors.torch import save_model

        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            existing = [p.name for p in folder.iterdir()]
            if set(existing) - {CONFIG_FILE, WEIGHTS_FILE}:
                raise ValueError(f"{folder} exists and holds other files ({', '.join(sorted(existing))}): give a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        model = self.model
        if dtype is not None:
            model = build_model(self.config)
            model.load_state_dict(self.model.state_dict())
            model.to(DTYPES[dtype])
        weights_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": config_to_dict(self.config),
            "data": {"class_path": self.data["class_path"], "init_args": self.data.get("init_args", {})},
            "dtype": weights_dtype,
        }
        # safetensors' save_model keeps one copy of tied weights (its save_file refuses shared tensors).
        save_model(model, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    def push_to_hub(
        self, repo_id: str, dtype: str | None = None, private: bool | None = None, token: str | None = None
    ) -> str:
        """``export`` into the Hugging Face Hub model repository ``repo_id`` ("owner/name", made if missing)
        -> the URL of the commit; ``load("hf://owner/name")`` reads it back. ``token``: as
        ``huggingface_hub`` finds it (``hf auth login``, ``HF_TOKEN``) when None."""
        import tempfile

        api = _hub().HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.export(Path(tmp) / "model", dtype)
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="megabyte export")
        return str(commit)


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError('the Hugging Face Hub needs huggingface_hub: pip install "megabyte-lightning[hub]"') from error
    return huggingface_hub


def download(location: str) -> Path:
    """``hf://owner/name`` (or ``hf://owner/name@revision``) -> a local folder holding its ``config.json`` and
    ``model.safetensors`` (huggingface_hub's cache: downloaded once)."""
    repo_id, _, revision = location.removeprefix(HUB).partition("@")
    folder = _hub().snapshot_download(repo_id, revision=revision or None, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    return Path(folder)


def _checkpoint_parts(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """A Lightning checkpoint written by ``fit`` -> (config, the model's state dict, data options)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(ckpt, dict) or "arch" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(f"{path}: no model hyperparameters in it (not saved by this project)")
    config = config_from_dict(ckpt["hyper_parameters"]["arch"])
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    hparams = {k: v for k, v in ckpt.get("datamodule_hyper_parameters", {}).items() if k != "_instantiator"}
    if "_class_path" not in hparams:
        raise ValueError(f"{path}: it does not record its data module (not saved by this project's CLI)")
    data = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
    return config, state, data


def _export_parts(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """A folder written by ``export`` -> (config, state dict, data options)."""
    from safetensors.torch import load_file

    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise ValueError(f"{folder}: no {file.name} in it (not a folder written by `megabyte export`)")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_file}: format {meta.get('format')!r} version {meta.get('format_version')!r} is not one this version reads")
    return config_from_dict(meta["arch"]), load_file(str(weights_file)), meta["data"]


def load(path: str | Path, device: str | torch.device | None = None, dtype: str | None = None) -> Pretrained:
    """A trained model from a checkpoint (``.ckpt``), an exported folder or ``hf://owner/name`` (an exported
    folder on the Hugging Face Hub) -> ``Pretrained``.

    device: where it runs (None: "cuda" when a GPU is present, else "cpu"); dtype: "float32" (default),
    "bfloat16" or "float16" weights.
    """
    path = download(path) if isinstance(path, str) and path.startswith(HUB) else Path(path)
    if path.is_dir():
        config, state, data = _export_parts(path)
    elif path.is_file():
        config, state, data = _checkpoint_parts(path)
    else:
        raise ValueError(f"{path}: no such checkpoint file or exported folder")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = build_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # safetensors' save_model keeps one name of tied weights: a missing name must share a loaded tensor.
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"{path}: its weights do not fit its config (missing {untied}, unexpected {unexpected})")
    model.to(torch.float32 if dtype is None else DTYPES[dtype])
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Pretrained(model, data)


def export(ckpt_path: str | Path, folder: str | Path, dtype: str | None = None) -> Path:
    """``load(ckpt_path, "cpu").export(folder, dtype)``: a checkpoint's weights and config, nothing of
    its optimizer state."""
    return load(ckpt_path, device="cpu").export(folder, dtype)
