"""One LightningDataModule per modality; each turns its media into a raw byte stream."""

from datamodules.text import TextDataModule

__all__ = ["TextDataModule"]
