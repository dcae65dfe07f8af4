"""``POST /v1/restore`` end to end with the tiny model over real HTTP: round trips in every format, the
JSON report, aligned crops, the API key, and every limit answered with its status code and one line."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib

import httpx
import numpy as np
import pytest
from _serve_helpers import API_KEY, SAMPLE, load_test_engine, metric_value, model_args, start_server
from PIL import Image

MAX_UPLOAD = 2 * 1024 * 1024
MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = load_test_engine(tiny_model_dir, api_key=API_KEY, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS,
                              max_output_pixels=16_000_000, max_batch=4, batch_wait_ms=5, max_queue=8)
    live = start_server(engine)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """``osdface restore``'s own objects (same loaders) for the expected outputs."""
    from osdface.cli.common import load_pipeline_from_args
    from osdface.face import FaceRestorer
    from osdface.face.detection import YuNetDetector

    pipe = load_pipeline_from_args(model_args(tiny_model_dir))
    return {"photo": FaceRestorer(pipe, detector=YuNetDetector(), color_fix="wavelet"),
            "crops": FaceRestorer(pipe, detector=None, color_fix="wavelet")}


def encode(rgb: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> tuple[str, np.ndarray]:
    img = Image.open(io.BytesIO(data))
    return img.format, np.asarray(img.convert("RGB"))


def assert_refused(resp: httpx.Response, status: int) -> str:
    """The status, a JSON body with a one-line ``detail`` and nothing of a traceback; returns the detail."""
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    return detail


@pytest.fixture(scope="module")
def sample_rgb() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE).convert("RGB"))


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt_in,fmt_out", [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")])
def test_whole_photo_round_trip(client, reference, sample_rgb, fmt_in, fmt_out):
    data = encode(sample_rgb, fmt_in, **({"lossless": True} if fmt_in == "WEBP" else {"quality": 95}))
    resp = client.post("/v1/restore", params={"format": fmt_out}, content=data,
                       headers={"Content-Type": f"image/{fmt_in.lower()}"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == f"image/{fmt_out}"
    assert resp.headers["x-faces"] == "1"
    got_fmt, got = decode(resp.content)
    assert got_fmt == fmt_out.upper()
    expected = reference["photo"].restore(decode(data)[1]).image
    assert got.shape == expected.shape == sample_rgb.shape
    diff = np.abs(got.astype(int) - expected.astype(int))
    if fmt_out == "png":
        assert diff.max() <= 1, "PNG out: the same pixels as FaceRestorer.restore"
    else:
        assert diff.mean() < 4, f"{fmt_out} out: close to FaceRestorer.restore (lossy)"
    assert np.abs(expected.astype(int) - decode(data)[1].astype(int)).max() > 0, "the face was changed"


def test_json_report(client, reference, sample_rgb):
    resp = client.post("/v1/restore", files={"image": ("whatever/../../etc/passwd", encode(sample_rgb, "PNG"))},
                       data={"format": "json", "upscale": "2"})
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert report["input_size"] == [512, 512] and report["output_size"] == [1024, 1024]
    assert report["image_format"] == "png" and report["aligned"] is False
    [face] = report["faces"]
    assert set(face) == {"box", "score", "landmarks", "identity", "identity_flagged", "kept_original"}
    x0, y0, x1, y1 = face["box"]
    assert 150 < (x0 + x1) / 2 < 300 and 50 < (y0 + y1) / 2 < 200, "the astronaut's face"
    assert len(face["landmarks"]) == 5 and 0 < face["score"] <= 1
    fmt, img = decode(base64.b64decode(report["image"]))
    assert fmt == "PNG" and img.shape == (1024, 1024, 3)
    from osdface.face import FaceRestorer

    r = reference["photo"]
    expected = FaceRestorer(r.pipeline, detector=r.detector, upscale=2, color_fix="wavelet",
                            identity="sface").restore(sample_rgb)
    assert np.abs(img.astype(int) - expected.image.astype(int)).max() <= 1
    # the identity check of osdface restore (SFace, input crop vs restored crop), face by face
    [ref_face] = expected.faces
    assert -1 <= ref_face.identity <= 1 and ref_face.identity < 0.999, "the tiny random model changes the face"
    assert face["identity"] == pytest.approx(ref_face.identity, abs=2e-4)
    assert face["identity_flagged"] is False and face["kept_original"] is False


def test_json_report_without_identity(tiny_model_dir, sample_rgb):
    """``osdface serve --no-identity``: the face report carries no identity fields."""
    from osdface.cli.serve import load_engine
    from osdface.serve.config import ServeConfig

    live = start_server(load_engine(model_args(tiny_model_dir, "--no-identity"), ServeConfig()))
    try:
        resp = httpx.post(f"{live.url}/v1/restore", params={"format": "json"}, content=encode(sample_rgb, "PNG"),
                          headers={"Content-Type": "image/png"}, timeout=120)
    finally:
        live.stop()
    assert resp.status_code == 200, resp.text
    [face] = resp.json()["faces"]
    assert set(face) == {"box", "score", "landmarks"}


@pytest.mark.parametrize("size,fmt", [(64, "PNG"), (128, "JPEG"), (64, "WEBP")])
def test_aligned_round_trip(client, reference, size, fmt):
    from osdface.testing import synthetic_faces

    crop = synthetic_faces(1, size=size, seed=3)[0]
    data = encode(crop, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    resp = client.post("/v1/restore?aligned=true&format=png", content=data,
                       headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 200, resp.text
    _, got = decode(resp.content)
    expected = reference["crops"].restore_crops(decode(data)[1][None])[0]
    assert got.shape == (size, size, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("aligned", [False, True])
def test_alpha_channel_kept(client, sample_rgb, aligned):
    rgb = sample_rgb[:128, :128] if aligned else sample_rgb
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    data = encode(np.dstack([rgb, alpha]), "PNG")
    resp = client.post("/v1/restore", params={"aligned": str(aligned).lower(), "format": "webp", "quality": "100"},
                       content=data)
    assert resp.status_code == 200, resp.text
    out = Image.open(io.BytesIO(resp.content))
    assert out.mode == "RGBA" and out.size == (rgb.shape[1], rgb.shape[0])
    assert np.abs(np.asarray(out)[..., 3].astype(int) - alpha).max() <= 2


def test_photo_without_a_face_comes_back_unchanged(client):
    flat = np.full((96, 128, 3), 90, np.uint8)
    resp = client.post("/v1/restore", content=encode(flat, "PNG"))
    assert resp.status_code == 200 and resp.headers["x-faces"] == "0"
    np.testing.assert_array_equal(decode(resp.content)[1], flat)


# ------------------------------------------------------------------------------------------ health, metrics, key


def test_health_routes_need_no_key(server):
    with httpx.Client(base_url=server.url) as anon:
        assert anon.get("/healthz").json() == {"status": "ok"}
        ready = anon.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong-key-000"}, {"Authorization": "Bearer nope-nope-1"},
                                     {"Authorization": API_KEY}])
@pytest.mark.parametrize("method,path", [("POST", "/v1/restore"), ("GET", "/metrics"), ("GET", "/no-such-route")])
def test_api_key_enforced(server, sample_rgb, headers, method, path):
    with httpx.Client(base_url=server.url, headers=headers) as c:
        resp = c.request(method, path, content=encode(sample_rgb, "PNG") if method == "POST" else None)
    assert_refused(resp, 401)
    assert resp.headers["www-authenticate"] == "Bearer"


def test_bearer_key_accepted(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert c.get("/metrics").status_code == 200


def test_metrics_count_requests_batches_and_errors(client, sample_rgb):
    client.post("/v1/restore", content=encode(sample_rgb, "PNG"))
    client.post("/v1/restore", content=b"not an image")
    text = client.get("/metrics").text
    assert metric_value(text, 'osdface_requests_total{code="200",route="/v1/restore"}') >= 1
    assert metric_value(text, 'osdface_requests_total{code="400",route="/v1/restore"}') >= 1
    assert metric_value(text, "osdface_batch_size_count") >= 1
    assert metric_value(text, 'osdface_request_errors_total{reason="bad_request"}') >= 1
    assert metric_value(text, "osdface_faces_restored_total") >= 1
    assert "osdface_request_duration_seconds_bucket" in text and "osdface_queue_faces" in text
    assert 'code="500"' not in text, "no request ended in a 500"


# ------------------------------------------------------------------------------------------ limits and bad input


def png_bomb(w: int = 40000, h: int = 40000) -> bytes:
    """A valid PNG header declaring w×h pixels over 100 bytes of data (1.6 GP: 4.8 GB if decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def jpeg_bomb(w: int = 30000, h: int = 30000) -> bytes:
    """A small JPEG whose SOF0 header is patched to declare w×h pixels."""
    data = bytearray(encode(np.full((16, 16, 3), 128, np.uint8), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)  # height, width after length (2) and precision (1)
    return bytes(data)


@pytest.mark.parametrize("bomb,side", [(png_bomb, 40000), (png_bomb, 5000), (jpeg_bomb, 30000), (jpeg_bomb, 8000)])
def test_decompression_bomb_refused_without_allocating(client, bomb, side):
    """Above PIL's own guard (179 MP: refused while opening) and between our limit and it (read from the header)."""
    data = bomb(side, side)
    assert len(data) < 2000
    before = Image.core.get_stats()["new_count"]  # every pixel buffer PIL allocates counts here
    resp = client.post("/v1/restore", content=data)
    detail = assert_refused(resp, 413)
    assert "decompression bomb" in detail
    if side * side < 178_956_970:
        assert f"{side}x{side}" in detail and "limit of 4 MP" in detail
    assert Image.core.get_stats()["new_count"] == before, "no pixel buffer was allocated for the bomb"


def test_upload_over_the_limit_refused_by_content_length(client):
    resp = client.post("/v1/restore", content=b"\0" * (MAX_UPLOAD + 1))
    assert "above the limit" in assert_refused(resp, 413)


def test_chunked_upload_over_the_limit_refused(client):
    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b"\0" * MAX_UPLOAD
        yield b"\0" * 1024

    resp = client.post("/v1/restore", content=chunks())
    assert "above the limit" in assert_refused(resp, 413)


def test_output_size_limit(client):
    big = np.full((1500, 2000, 3), 100, np.uint8)  # 3 MP in; ×4 would be 48 MP out
    resp = client.post("/v1/restore?upscale=4", content=encode(big, "PNG"))
    assert "output limit" in assert_refused(resp, 413)


@pytest.mark.parametrize("fmt,query,width", [("webp", "format=webp", 4200), ("jpeg", "format=jpeg", 16400),
                                             ("webp", "format=json&image_format=webp", 4200)])
def test_output_side_above_the_format_limit_is_413(client, fmt, query, width):
    """Under the output pixel limit, but ×4 is wider than the format can encode: 413 before any work."""
    wide = np.full((4, width, 3), 100, np.uint8)
    resp = client.post(f"/v1/restore?upscale=4&{query}", content=encode(wide, "PNG"))
    assert f"{fmt} limit" in assert_refused(resp, 413)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_format_not_allowed(client, fmt):
    resp = client.post("/v1/restore", content=encode(np.zeros((32, 32, 3), np.uint8), fmt))
    assert fmt in assert_refused(resp, 415)


@pytest.mark.parametrize("ctype", ["text/plain", "application/json", "application/x-www-form-urlencoded"])
def test_wrong_content_type(client, ctype):
    assert_refused(client.post("/v1/restore", content=b"abc", headers={"Content-Type": ctype}), 415)


def _truncated_jpeg(sample_rgb):
    data = encode(sample_rgb, "JPEG", quality=90)
    return data[: len(data) // 2]


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated", "not-square-aligned", "unknown-option",
                                  "bad-value", "nan-upscale", "upscale-too-large", "twice", "twice-query-and-form",
                                  "no-image-field", "other-file-field", "two-files", "upscale-aligned",
                                  "tiny-aligned", "broken-multipart", "bad-content-length"])
def test_malformed_requests_get_400(client, server, sample_rgb, case):
    png = encode(sample_rgb, "PNG")
    post = client.post
    if case == "empty":
        resp = post("/v1/restore", content=b"")
    elif case == "garbage":
        resp = post("/v1/restore", content=b"\x89PNG garbage" * 10)
    elif case == "truncated":
        resp = post("/v1/restore", content=_truncated_jpeg(sample_rgb))
    elif case == "not-square-aligned":
        resp = post("/v1/restore?aligned=1", content=encode(np.zeros((64, 80, 3), np.uint8), "PNG"))
    elif case == "unknown-option":
        resp = post("/v1/restore?output=/tmp/x.png", content=png)
    elif case == "bad-value":
        resp = post("/v1/restore?color_fix=sepia", content=png)
    elif case == "nan-upscale":
        resp = post("/v1/restore?upscale=nan", content=png)
    elif case == "upscale-too-large":
        resp = post("/v1/restore?upscale=9", content=png)
    elif case == "twice":
        resp = post("/v1/restore?format=png&format=json", content=png)
    elif case == "twice-query-and-form":
        resp = post("/v1/restore?format=png", files={"image": ("a.png", png)}, data={"format": "json"})
    elif case == "no-image-field":
        resp = post("/v1/restore", data={"format": "json"}, files={"nothing": ("", b"")})
    elif case == "other-file-field":
        resp = post("/v1/restore", files={"photo": ("a.png", png)})
    elif case == "two-files":
        resp = post("/v1/restore", files=[("image", ("a.png", png)), ("image", ("b.png", png))])
    elif case == "upscale-aligned":
        resp = post("/v1/restore?aligned=true&upscale=2", content=png)
    elif case == "tiny-aligned":
        resp = post("/v1/restore?aligned=true", content=encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    elif case == "broken-multipart":
        resp = post("/v1/restore", content=b"--xyz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
                    headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    else:  # a Content-Length that is not a number, sent on a raw socket (clients refuse to)
        import socket

        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST /v1/restore HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
                      "Content-Length: 12abc\r\n\r\n".encode())
            raw = s.recv(65536).decode("latin-1")
        assert raw.startswith("HTTP/1.1 400"), raw
        assert "Traceback" not in raw
        return
    assert_refused(resp, 400)


def test_wrong_method(client):
    assert_refused(client.get("/v1/restore"), 405)


@pytest.mark.parametrize("field,status", [("image", 200), ("photo", 400)])
def test_multipart_upload_is_closed_when_answered(client, sample_rgb, monkeypatch, field, status):
    """The form's spooled upload file is closed by the request (answered or refused), not left to the GC."""
    from starlette.datastructures import UploadFile

    closed: list[str] = []
    real_close = UploadFile.close

    async def close(self):
        closed.append(self.filename)
        await real_close(self)

    monkeypatch.setattr(UploadFile, "close", close)
    resp = client.post("/v1/restore", files={field: ("up.png", encode(sample_rgb, "PNG"))})
    assert resp.status_code == status, resp.text
    assert closed == ["up.png"]


def test_nothing_from_the_request_reaches_the_file_system(client, sample_rgb, tmp_path, monkeypatch):
    """A multipart file name with a path and options that look like paths are never written or opened."""
    monkeypatch.chdir(tmp_path)
    resp = client.post("/v1/restore", files={"image": ("../../evil.png", encode(sample_rgb, "PNG"))})
    assert resp.status_code == 200
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent.parent / "evil.png").exists()


# ------------------------------------------------------------------------------------------ timeout and a full queue


def test_request_timeout_gets_504(tiny_model_dir, sample_rgb):
    engine = load_test_engine(tiny_model_dir, request_timeout_s=0.001)
    live = start_server(engine)
    try:
        resp = httpx.post(f"{live.url}/v1/restore", content=encode(sample_rgb, "PNG"), timeout=120)
        assert "longer than 0.001 s" in assert_refused(resp, 504)
        assert httpx.get(f"{live.url}/healthz").status_code == 200
    finally:
        live.stop()


def test_full_queue_gets_503_with_retry_after(tiny_model_dir, sample_rgb):
    """One request admitted (held at the CPU stage by a task that occupies the only CPU thread), the next
    is refused at once with 503 + Retry-After; the first is answered when the CPU thread is free."""
    engine = load_test_engine(tiny_model_dir, max_queue=1, cpu_workers=1, retry_after_s=3)
    live = start_server(engine)
    gate = threading.Event()
    try:
        engine.cpu_executor.submit(gate.wait, 120)
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(
            resp=httpx.post(f"{live.url}/v1/restore", content=encode(sample_rgb, "PNG"), timeout=120)))
        t.start()
        for _ in range(1200):  # wait (bounded) until the first request is admitted
            if metric_value(httpx.get(f"{live.url}/metrics").text, "osdface_requests_in_flight") == 1:
                break
            gate.wait(0.05)
        second = httpx.post(f"{live.url}/v1/restore", content=encode(sample_rgb, "PNG"), timeout=120)
        assert "busy" in assert_refused(second, 503)
        assert second.headers["retry-after"] == "3"
        gate.set()
        t.join(120)
        assert first["resp"].status_code == 200
        text = httpx.get(f"{live.url}/metrics").text
        assert metric_value(text, 'osdface_request_errors_total{reason="overloaded"}') == 1
    finally:
        gate.set()
        live.stop()


def test_json_body_is_valid_for_every_error(client):
    """Error bodies are JSON objects with exactly one key (no framework validation dumps)."""
    resp = client.post("/v1/restore?quality=0", content=b"x")
    assert_refused(resp, 400)
    assert list(json.loads(resp.text)) == ["detail"]
