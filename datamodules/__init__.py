"""One LightningDataModule per modality; each turns its media into a raw byte stream and back."""

from datamodules.audio import AudioDataModule
from datamodules.base import ByteDataModule
from datamodules.image import ImageDataModule
from datamodules.text import TextDataModule

__all__ = ["AudioDataModule", "ByteDataModule", "ImageDataModule", "TextDataModule"]
