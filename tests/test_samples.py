"""The sample callback: samples in TensorBoard after every n-th validation, each in its medium, and its
options checked when it is built. (``cli.py generate`` and ``sampling.py`` are tests/test_sampling.py's.)"""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.samples import SampleCallback
from datamodules import TextDataModule
from megabyte import MegaByteLM
from sampling import as_code_block
from tests.conftest import tiny_megabyte_config


def events(log_dir: Path) -> EventAccumulator:
    (event_file,) = log_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file.parent), size_guidance={"tensors": 0, "images": 0, "audio": 0})
    accumulator.Reload()
    return accumulator


def fit_with_samples(datamodule: L.LightningDataModule, tmp_path: Path, callback: SampleCallback) -> EventAccumulator:
    torch.manual_seed(0)
    model = MegaByteLM(tiny_megabyte_config(max_seq_len=datamodule.seq_len), warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1,
        logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule)
    return events(tmp_path / "run")


def text_summaries(accumulator: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in accumulator.Tensors(tag)]


def test_text_samples_are_logged_as_code_blocks_every_n_validations(text_file, tmp_path):
    datamodule = TextDataModule(str(text_file), seq_len=32, batch_size=2, num_workers=0, cache_dir=str(tmp_path))
    callback = SampleCallback(every_n_validations=2, n_samples=2, sample_len=24, prompt_fraction=0.5)
    accumulator = fit_with_samples(datamodule, tmp_path, callback)
    tags = accumulator.Tags()["tensors"]
    assert sorted(tags) == ["samples/text/0/text_summary", "samples/text/1/text_summary"]
    # two validations (steps 2 and 4) after the sanity check: samples after the second only
    ((step, text),) = text_summaries(accumulator, "samples/text/0/text_summary")
    assert step == 4
    prompt = datamodule.examples(2)[0][:12]  # the first 12 bytes of a validation window
    assert as_code_block(datamodule.decode(prompt)) in text
    assert text.startswith("**prompt**") and "**continuation**" in text


def test_sample_callback_rejects_bad_options():
    with pytest.raises(ValueError, match="every_n_validations >= 0"):
        SampleCallback(every_n_validations=-1)
    with pytest.raises(ValueError, match="n_samples >= 1"):
        SampleCallback(n_samples=0)
    # Sampling options too, at once: at the first validation the run would end before its checkpoint.
    for options, message in [
        ({"temperature": -1}, "temperature must be >= 0"), ({"top_p": 0}, "top_p must be in"),
        ({"top_k": 300}, "top_k must be in"), ({"prompt_fraction": 1.0}, "prompt_fraction must be in"),
        ({"sample_len": 0}, "sample_len must be >= 1"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            SampleCallback(**options)


def test_image_samples_are_a_grid_of_originals_beside_completions(tmp_path):
    from datamodules import ImageDataModule
    from tests.image_files import write_image_folder

    datamodule = ImageDataModule(
        str(write_image_folder(tmp_path / "images", n=12, size=8)), image_size=8, channels=3, scan="patch",
        scan_patch=2, batch_size=2, num_workers=0, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    callback = SampleCallback(n_samples=1, sample_len=16)  # images always use the whole image
    accumulator = fit_with_samples(datamodule, tmp_path, callback)
    (tag,) = accumulator.Tags()["images"]
    image = accumulator.Images(tag)[-1]
    # one original beside its completion, 8 x 8 each, make_grid's 2-pixel padding
    assert (image.height, image.width) == (12, 22)
    # the original's top half, which was the prompt, is also the completion's top half
    from PIL import Image
    import io

    grid = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))  # (12, 22, 3)
    original, completion = grid[2:10, 2:10], grid[2:10, 12:20]
    assert np.array_equal(original[:4], completion[:4])
    assert np.array_equal(original, datamodule.decode(datamodule.examples(1)[0]).permute(1, 2, 0).numpy())


def test_audio_samples_are_playable_at_the_data_sample_rate(tmp_path):
    from datamodules import AudioDataModule
    from tests.audio_files import write_wav_folder

    datamodule = AudioDataModule(
        str(write_wav_folder(tmp_path / "audio", n=12)), seq_len=32, batch_size=2, sample_rate=8000,
        num_workers=0, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    accumulator = fit_with_samples(datamodule, tmp_path, SampleCallback(n_samples=2, sample_len=32))
    tags = sorted(accumulator.Tags()["audio"])
    assert tags == ["samples/audio/0", "samples/audio/1"]
    audio = accumulator.Audio(tags[0])[-1]
    assert audio.sample_rate == 8000 and audio.length_frames == 16  # 32 bytes of 16-bit PCM
    assert audio.encoded_audio_string[:4] == b"RIFF"

