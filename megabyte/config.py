"""The configs of both architectures: their options, the checks that refuse an impossible one, and
their plain-dict form (what a checkpoint stores).

Symbols follow the paper: V = 256 byte values, T = max_seq_len, P = patch_size, D_G = d_global / P.
"""

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

VOCAB_SIZE = 256  # V: one token per byte value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _multiple_hint(value: int, base: int) -> str:
    """Valid values near ``value`` that are multiples of ``base``, for error messages."""
    lower = value // base * base
    return f"{lower} or {lower + base}" if lower > 0 else f"{base}"


@dataclass
class ModelConfig:
    """Options shared by MegaByteConfig and ByteTransformerConfig (the CLI picks one by class_path)."""

    max_seq_len: int = 8192
    """Longest sequence in bytes (T). Linked to ``data.seq_len`` in the CLI."""
    ffn_ratio: int = 4
    """Hidden width of every feed-forward layer, as a multiple of its model width."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches (none on embeddings). The paper trains with
    0.1 (configs/enwik8.yaml); 0 keeps a bare model deterministic and suits short runs."""
    init_std: float = 0.006
    """Standard deviation of the truncated-normal init (truncated at 2 sigma); the paper's 0.006."""
    tie_embeddings: bool = True
    """Tie the output projection to the (local) byte embedding, as in the paper."""
    autocast_residual: bool = True
    """Under autocast (``precision: bf16-mixed``), carry the residual stream of every Transformer stack in
    bf16: half the memory traffic of its norms and adds, which bound the local model's speed on a GPU.
    False keeps it in float32 (the embeddings' dtype). No effect without autocast."""

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{name} must be a positive integer, got {value!r}",
            )

    def _check_multiple(self, name: str, base_name: str, why: str = "") -> None:
        value, base = getattr(self, name), getattr(self, base_name)
        _require(
            value % base == 0,
            f"{name} {value} is not a multiple of {base_name} {base}{why}: use {name} {_multiple_hint(value, base)}",
        )

    def __post_init__(self) -> None:
        self._check_positive("max_seq_len", "ffn_ratio")
        _require(
            0.0 <= self.dropout < 1.0,
            f"dropout must be in [0, 1), got {self.dropout!r} (the paper uses 0.1)",
        )
        _require(
            self.init_std > 0.0,
            f"init_std must be positive, got {self.init_std!r} (the paper uses 0.006)",
        )


@dataclass
class MegaByteConfig(ModelConfig):
    """Hyperparameters of a MEGABYTE model (paper Section 2)."""

    patch_size: int = 8
    """Bytes per patch (P); ``max_seq_len`` must be a multiple. The paper: 8 for text, 12 for ImageNet 64, 32 for audio."""
    d_global: int = 1024
    """Width of the global model (P * D_G); a multiple of ``patch_size`` and of ``n_global_heads``."""
    n_global_layers: int = 12
    """Number of blocks in the global model."""
    n_global_heads: int = 16
    """Attention heads in the global model."""
    d_local: int = 512
    """Width of the local model; a multiple of ``n_local_heads``."""
    n_local_layers: int = 6
    """Number of blocks in the local model."""
    n_local_heads: int = 8
    """Attention heads in the local model."""
    cross_patch_bytes: int = 0
    """Cross-patch attention (r, 0..patch_size): the local model of a patch also attends to the last r
    bytes of the previous patch, so the first bytes of a patch see the bytes just before it. 0 is the
    paper's main model (every patch alone); the paper's ablation leaves r open. Costs (r + P) / P times
    the local model's work."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive(
            "patch_size", "d_global", "n_global_layers", "n_global_heads", "d_local", "n_local_layers", "n_local_heads"
        )
        self._check_multiple("max_seq_len", "patch_size", " (max_seq_len is data.seq_len in the CLI)")
        self._check_multiple("d_global", "patch_size", " (every byte gets d_global / patch_size global dimensions)")
        self._check_multiple("d_global", "n_global_heads")
        self._check_multiple("d_local", "n_local_heads")
        _require(
            isinstance(self.cross_patch_bytes, int) and not isinstance(self.cross_patch_bytes, bool)
            and 0 <= self.cross_patch_bytes <= self.patch_size,
            f"cross_patch_bytes must be an integer in 0..patch_size ({self.patch_size}), got {self.cross_patch_bytes!r}: "
            "the local model attends to at most the whole previous patch",
        )
        # Each patch's global output (d_global wide) is projected into the local model's P positions; a
        # local model wider than the global one would spend more on a byte than the model spends on its patch.
        _require(
            self.d_local <= self.d_global,
            f"d_local {self.d_local} is wider than d_global {self.d_global}: use d_local <= d_global "
            f"(e.g. d_local {max(self.n_local_heads, self.d_global // 2 // self.n_local_heads * self.n_local_heads)})",
        )


@dataclass
class ByteTransformerConfig(ModelConfig):
    """Hyperparameters of the byte-level decoder-only Transformer baseline."""

    d_model: int = 768
    """Model width; a multiple of ``n_heads``."""
    n_layers: int = 12
    """Number of blocks."""
    n_heads: int = 12
    """Attention heads."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_positive("d_model", "n_layers", "n_heads")
        self._check_multiple("d_model", "n_heads")


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}``: plain data, safe in a checkpoint. The class path is
    the package's (``megabyte.MegaByteConfig``, as configs write it), which stays where modules move."""
    cls = type(config)
    module = "megabyte" if cls.__module__.startswith("megabyte.") else cls.__module__
    return {"class_path": f"{module}.{cls.__qualname__}", "init_args": dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of ``config_to_dict``; only ModelConfig subclasses are accepted. Older checkpoints name
    ``megabyte.model.MegaByteConfig``: that module still exports the configs."""
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, ModelConfig)):
        raise TypeError(f"{data['class_path']} is not a model config")
    return cls(**data.get("init_args", {}))
