"""Seeded mutations of real PNG/JPEG/WebP uploads: the service answers each with 200 or a 4xx, never a 5xx."""

from __future__ import annotations

import io
import random

import httpx
import pytest
from _serve_helpers import SAMPLE, load_test_engine, start_server
from PIL import Image

pytestmark = pytest.mark.slow


def mutated(seed_files: list[bytes], rng: random.Random) -> bytes:
    d = bytearray(rng.choice(seed_files))
    for _ in range(rng.randint(1, 8)):
        op, pos = rng.random(), rng.randrange(len(d))
        if op < 0.5:
            d[pos] = rng.randrange(256)
        elif op < 0.75:
            del d[pos:pos + rng.randint(1, 50)]
        else:
            d[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
    return bytes(d)


def test_mutated_uploads_never_get_5xx(tiny_model_dir):
    seeds = []
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.open(SAMPLE).resize((96, 96)).save(buf, format=fmt)
        seeds.append(buf.getvalue())
    live = start_server(load_test_engine(tiny_model_dir, max_pixels=4_000_000))
    rng = random.Random(0)
    codes: dict[int, int] = {}
    try:
        with httpx.Client(base_url=live.url, timeout=120) as client:
            for _ in range(400):
                params = rng.choice([{}, {"aligned": "true"}, {"format": "json"}, {"format": "webp"}])
                resp = client.post("/v1/restore", params=params, content=mutated(seeds, rng))
                codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
                assert resp.status_code < 500, resp.text
                if resp.status_code != 200:
                    assert "\n" not in resp.json()["detail"]
    finally:
        live.stop()
    assert codes.get(200, 0) > 0 and codes.get(400, 0) > 0, codes
