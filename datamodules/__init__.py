"""One LightningDataModule per modality; each turns its media into a raw byte stream and back.

``base.py`` (what every DataModule offers and shares) and ``windows.py`` (windows over a byte stream)
are the bottom layer; ``text.py``, ``image/`` and ``audio/`` build on them and never on each other.
"""

from datamodules.audio import AudioDataModule
from datamodules.base import ByteDataModule
from datamodules.image import ImageDataModule
from datamodules.text import TextDataModule

__all__ = ["AudioDataModule", "ByteDataModule", "ImageDataModule", "TextDataModule"]
