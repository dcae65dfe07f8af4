"""A bounded load test on 127.0.0.1: 64 concurrent clients × 4 requests (whole photos and aligned crops) against
the tiny model. Every request gets 200 or 503 (a full queue), the server stays up, and ``/metrics`` shows model
batches of more than one face. Stops by itself: fixed request count, per-request client timeout."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
from _serve_helpers import API_KEY, SAMPLE, load_test_engine, metric_value, start_server
from PIL import Image

pytestmark = pytest.mark.slow

CLIENTS, REQUESTS_EACH = 64, 4


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("replicas", [1, 2])
def test_64_clients_x_4_requests(tiny_model_dir, replicas):
    from osdface.testing import synthetic_faces

    engine = load_test_engine(tiny_model_dir, api_key=API_KEY, max_batch=8, batch_wait_ms=20, max_queue=24,
                              cpu_workers=2, replicas=replicas)
    live = start_server(engine)
    photo = SAMPLE.read_bytes()
    crop = _png(synthetic_faces(1, seed=5)[0])

    async def client(i: int, http: httpx.AsyncClient) -> list[int]:
        codes = []
        for j in range(REQUESTS_EACH):
            aligned = (i + j) % 2 == 1
            resp = await http.post("/v1/restore", params={"aligned": str(aligned).lower()},
                                   content=crop if aligned else photo)
            if resp.status_code == 503:
                assert resp.headers["retry-after"] == "1"
            elif resp.status_code == 200:
                Image.open(io.BytesIO(resp.content)).verify()
            codes.append(resp.status_code)
        return codes

    async def main():
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=live.url, headers={"X-API-Key": API_KEY}, timeout=300,
                                     limits=limits) as http:
            return await asyncio.gather(*(client(i, http) for i in range(CLIENTS)))

    try:
        codes = [c for cs in asyncio.run(main()) for c in cs]
        health = httpx.get(f"{live.url}/healthz")
        metrics = httpx.get(f"{live.url}/metrics", headers={"X-API-Key": API_KEY}).text
        after = httpx.post(f"{live.url}/v1/restore", content=photo, headers={"X-API-Key": API_KEY}, timeout=300)
    finally:
        live.stop()
    assert len(codes) == CLIENTS * REQUESTS_EACH
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert codes.count(200) > 0
    assert health.status_code == 200 and after.status_code == 200, "the server is still up and serving"
    batches = metric_value(metrics, "osdface_batch_size_count")
    singles = metric_value(metrics, 'osdface_batch_size_bucket{le="1.0"}')
    assert batches > singles, "some model calls held more than one face"
    faces = metric_value(metrics, "osdface_faces_restored_total")
    assert faces == codes.count(200), "one face per photo or crop answered"
    assert metric_value(metrics, 'osdface_requests_total{code="200",route="/v1/restore"}') == codes.count(200)
    assert np.isclose(metric_value(metrics, 'osdface_request_errors_total{reason="overloaded"}'), codes.count(503))
