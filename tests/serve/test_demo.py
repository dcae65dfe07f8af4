"""The demo's restore function without a browser: Gradio hands it the upload's file path (never a decoded
array), so the engine's header check (``--max-pixels``) protects the demo as it protects the API."""

from __future__ import annotations

import asyncio
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from _serve_helpers import SAMPLE, load_test_engine
from PIL import Image


def png_bomb(w: int, h: int) -> bytes:
    """A valid PNG header declaring w×h pixels over a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: the engine starts its batcher in the first loop that calls it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def demo(tiny_model_dir, loop):
    from osdface.serve.demo import build_demo

    engine = load_test_engine(tiny_model_dir, max_pixels=1_000_000)
    demo = build_demo(engine)
    yield demo
    loop.run_until_complete(engine.close())
    demo.osdface_downloads.cleanup()


def _upload(demo, path: Path):
    """What the demo's function receives for an upload of ``path`` (the input component's preprocess)."""
    from gradio.data_classes import ImageData

    [inp] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "input-image"]
    return inp.preprocess(ImageData(path=str(path), orig_name=path.name))


def _restore(demo):
    [fn] = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "restore"]
    return fn


def test_demo_upload_over_max_pixels_refused_before_decoding(demo, loop, tmp_path):
    import gradio as gr

    from osdface.serve.demo import MODES

    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(5000, 5000))  # 25 MP declared, limit 1 MP
    before = Image.core.get_stats()["new_count"]  # every pixel buffer PIL allocates counts here
    value = _upload(demo, path)
    assert isinstance(value, str), "the demo gets a file path, not a decoded image"
    with pytest.raises(gr.Error) as e:
        loop.run_until_complete(_restore(demo)(value, MODES[0], 1, "wavelet", False, "png"))
    assert "5000x5000" in e.value.message and "limit of 1 MP" in e.value.message
    assert Image.core.get_stats()["new_count"] == before, "no pixel buffer was allocated for the bomb"


def test_demo_restores_an_upload(demo, loop, tmp_path):
    from osdface.serve.demo import MODES

    path = tmp_path / SAMPLE.name
    path.write_bytes(SAMPLE.read_bytes())
    (before, after), crops, download, status = loop.run_until_complete(
        _restore(demo)(_upload(demo, path), MODES[0], 2, "wavelet", False, "webp"))
    h, w = np.asarray(Image.open(SAMPLE)).shape[:2]
    assert after.shape == (2 * h, 2 * w, 3) and before.shape == after.shape and before.dtype == np.uint8
    assert len(crops) == 1 and "1 face(s) restored" in status
    assert Image.open(download).format == "WEBP" and Image.open(download).size == (2 * w, 2 * h)
