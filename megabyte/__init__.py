"""MEGABYTE (Yu et al., 2023): multiscale byte-level transformers, in PyTorch and Lightning.

Everything here needs torch alone; ``MegaByteLM`` (``megabyte.lm``, the LightningModule) is imported
on first use, so ``from megabyte import MegaByte`` loads no Lightning. ``load`` and ``export``
(``megabyte.pretrained``: a trained model from Python) are imported on first use too.
"""

from megabyte.config import ByteTransformerConfig, MegaByteConfig, ModelConfig
from megabyte.generation import generate
from megabyte.model import ByteTransformer, MegaByte, build_model

__all__ = [
    "ByteTransformer", "ByteTransformerConfig", "MegaByte", "MegaByteConfig", "MegaByteLM", "ModelConfig",
    "build_model", "export", "generate", "load",
]  # fmt: skip


def __getattr__(name: str):
    if name == "MegaByteLM":
        from megabyte.lm import MegaByteLM

        return MegaByteLM
    if name in ("load", "export", "Pretrained"):
        from megabyte import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'megabyte' has no attribute {name!r}")
