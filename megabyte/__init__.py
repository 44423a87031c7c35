"""MEGABYTE (Yu et al., 2023): multiscale byte-level transformers, in PyTorch and Lightning."""

from megabyte.lm import MegaByteLM
from megabyte.model import ByteTransformer, ByteTransformerConfig, MegaByte, MegaByteConfig, ModelConfig

__all__ = ["ByteTransformer", "ByteTransformerConfig", "MegaByte", "MegaByteConfig", "MegaByteLM", "ModelConfig"]
