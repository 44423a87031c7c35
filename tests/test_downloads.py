"""A partial download is never taken for a complete one (enwik8; no network: urlopen is faked)."""

import io
import zipfile

import pytest

import datamodules.text
from datamodules.text import download_enwik8


class FakeResponse(io.BytesIO):
    def __init__(self, body: bytes, declared: int) -> None:
        super().__init__(body)
        self.headers = {"Content-Length": str(declared)}


def fake_enwik8_zip(n_bytes: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", b"a" * n_bytes)
    return buffer.getvalue()


def test_a_download_cut_short_is_not_kept(tmp_path, monkeypatch):
    archive = fake_enwik8_zip(1000)
    monkeypatch.setattr(datamodules.text.urllib.request, "urlopen", lambda *a, **k: FakeResponse(archive[:100], len(archive)))
    with pytest.raises(RuntimeError, match="closed after 100 of"):
        download_enwik8(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_archive_from_an_earlier_run_is_removed(tmp_path):
    (tmp_path / "enwik8.zip").write_bytes(fake_enwik8_zip(1000)[:-30])
    with pytest.raises(RuntimeError, match="not a complete enwik8 archive.*removed it"):
        download_enwik8(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_archive_of_the_wrong_size_is_refused(tmp_path, monkeypatch):
    archive = fake_enwik8_zip(1000)
    monkeypatch.setattr(datamodules.text.urllib.request, "urlopen", lambda *a, **k: FakeResponse(archive, len(archive)))
    with pytest.raises(RuntimeError, match="has 1000 bytes, expected 100000000"):
        download_enwik8(tmp_path)
    assert not (tmp_path / "enwik8").exists()
