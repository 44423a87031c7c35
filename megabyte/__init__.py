"""MEGABYTE (Yu et al., 2023): multiscale byte-level transformers, in PyTorch and Lightning.

Everything here needs torch alone; ``MegaByteLM`` (``megabyte.lm``, the LightningModule) is imported
on first use, so ``from megabyte import MegaByte`` loads no Lightning.
"""

from megabyte.config import ByteTransformerConfig, MegaByteConfig, ModelConfig
from megabyte.generation import generate
from megabyte.model import ByteTransformer, MegaByte, build_model

__all__ = [
    "ByteTransformer", "ByteTransformerConfig", "MegaByte", "MegaByteConfig", "MegaByteLM", "ModelConfig",
    "build_model", "generate",
]  # fmt: skip


def __getattr__(name: str):
    if name == "MegaByteLM":
        from megabyte.lm import MegaByteLM

        return MegaByteLM
    raise AttributeError(f"module 'megabyte' has no attribute {name!r}")
