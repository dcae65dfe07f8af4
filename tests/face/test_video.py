"""Video restoration through imageio-ffmpeg: frames, frame rate, audio, rotation, landmark smoothing."""

import contextlib
import io
import json
import re
import subprocess
import wave
from fractions import Fraction

import cv2
import imageio_ffmpeg
import numpy as np
import pytest

from osdface.cli import main
from osdface.face import FaceRestorer
from osdface.face.types import Detection
from osdface.face.video import (
    LandmarkSmoother,
    OneEuroFilter,
    exact_fps,
    ffmpeg_exe,
    probe_video,
    read_frames,
    restore_video,
)

N_FRAMES, FPS, SIZE = 6, 12.0, 192


def _frames(astronaut):
    base = cv2.resize(astronaut, (SIZE, SIZE), interpolation=cv2.INTER_AREA)  # face ≈ 35 px
    return [np.roll(base, (i, 2 * i), axis=(0, 1)) for i in range(N_FRAMES)]


def _sine_wav(path, seconds, rate=8000):
    """A 440 Hz mono 16-bit WAV (the audio track of the test clip)."""
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())


def _write_lossless(path, frames, fps, audio=None):
    """H.264 lossless (qp 0, 4:4:4) through imageio-ffmpeg's writer, with an AAC track from ``audio``."""
    h, w = frames[0].shape[:2]
    kw = {"audio_path": str(audio), "audio_codec": "aac"} if audio is not None else {}
    gen = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv444p",
                                      quality=None, output_params=["-qp", "0"], macro_block_size=1,
                                      ffmpeg_log_level="error", **kw)
    gen.send(None)
    for f in frames:
        gen.send(np.ascontiguousarray(f))
    gen.close()


def _streams(path) -> str:
    """ffmpeg's own description of a file's streams (``ffmpeg -i``; it exits 1 without an output)."""
    r = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True, check=False)
    return r.stderr


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut):
    """A short real clip: the astronaut drifting, with a sine audio track."""
    d = tmp_path_factory.mktemp("video")
    _sine_wav(d / "tone.wav", N_FRAMES / FPS)
    _write_lossless(d / "clip.mp4", _frames(astronaut), FPS, audio=d / "tone.wav")
    return d / "clip.mp4"


def test_video_cli_restores_every_frame_keeps_fps_and_audio(clip, tiny_model_dir, tmp_path):
    path = clip
    assert "Audio: aac" in _streams(path)
    out = tmp_path / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["restore", str(path), "-o", str(out), "--model", str(tiny_model_dir), "--batch-size", "6",
                   "--report", str(tmp_path / "r.json")])
    assert rc == 0, err.getvalue()
    result = out / "clip.mp4"
    info = probe_video(result)
    assert info.fps == pytest.approx(FPS, rel=1e-3)
    assert (info.width, info.height) == (SIZE, SIZE)
    frames = list(read_frames(result))
    assert len(frames) == N_FRAMES
    src = list(read_frames(path))
    # the face region changed (tiny random model), the far background did not (beyond codec noise)
    diff = [np.abs(a.astype(int) - b).mean(2) for a, b in zip(frames, src)]
    centre = [d[40 + i:52 + i, 80 + 2 * i:92 + 2 * i].mean() for i, d in enumerate(diff)]  # face ≈ [69, 25, 102, 67]
    assert min(centre) > 4, centre
    far = [d[150:, :60].mean() for d in diff]
    assert max(far) < 6 and max(far) < 0.5 * min(centre), (far, centre)  # H.264 4:2:0 noise only
    # the source's audio stream is in the output (AAC copied), as ffmpeg itself sees the file
    assert info.audio_codec == "aac" and "Audio: aac" in _streams(result)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary file left"
    report = json.loads((tmp_path / "r.json").read_text())
    faces = report["images"][0]["faces"]
    assert sorted({f["frame"] for f in faces}) == list(range(N_FRAMES)), "a face in every frame"


def test_rotated_clip_is_restored_upright(astronaut, tiny_pipe, yunet, tmp_path):
    """A clip stored sideways with a 90° display rotation (a phone video) reaches the face layer
    upright (ffmpeg applies the rotation while decoding) and is written upright with no rotation
    tag, so it displays as the source does; a clip without audio gets none."""
    upright = [f[:, 32:160] for f in _frames(astronaut)]  # 128 wide, 192 tall; the face stays inside
    stored = tmp_path / "stored.mp4"
    _write_lossless(stored, [np.rot90(f, k=-1) for f in upright], FPS)  # stored 192 wide, 128 tall
    rotated = tmp_path / "rotated.mp4"
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-display_rotation", "90",
                    "-i", str(stored), "-c", "copy", str(rotated)], check=True)
    assert "Display Matrix: rotation of 90" in _streams(rotated)
    info = probe_video(rotated)
    assert (info.width, info.height, info.coded_size) == (128, 192, (192, 128))
    assert info.audio_codec is None and info.frames == N_FRAMES
    got = list(read_frames(rotated))
    assert len(got) == N_FRAMES  # upright, up to the RGB → YUV → RGB rounding of the lossless codec
    assert all(np.abs(g.astype(int) - u).max() <= 2 for g, u in zip(got, upright))

    restorer = FaceRestorer(tiny_pipe, detector=yunet, batch_size=N_FRAMES)
    vr = restore_video(restorer, rotated, tmp_path / "out.mp4")
    assert vr.frames == N_FRAMES and vr.failed_frames == 0 and not vr.audio
    assert all(len(d) == 1 for d in vr.faces_per_frame), "the face is found in every (upright) frame"
    out = probe_video(tmp_path / "out.mp4")
    assert (out.width, out.height, out.coded_size) == (128, 192, (128, 192)), "stored upright"
    assert out.fps == pytest.approx(FPS, rel=1e-3) and out.audio_codec is None
    text = _streams(tmp_path / "out.mp4")
    assert "Display Matrix" not in text and not re.search(r"rotate\s*:", text) and "Audio:" not in text
    written = list(read_frames(tmp_path / "out.mp4"))
    far = [np.abs(w[150:, :40].astype(int) - u[150:, :40]).mean() for w, u in zip(written, upright)]
    assert len(written) == N_FRAMES and max(far) < 6, far  # same orientation as the upright source


def test_unreadable_video_named(tmp_path):
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(ValueError, match=r"text\.mp4: cannot open video \(.*Invalid data"):
        probe_video(tmp_path / "text.mp4")
    with pytest.raises(ValueError, match=r"missing\.mp4: cannot open video \(.*No such file"):
        list(read_frames(tmp_path / "missing.mp4"))


def test_exact_fps_keeps_ntsc_rates():
    assert exact_fps(29.97) == Fraction(30000, 1001) and exact_fps(23.98) == Fraction(24000, 1001)
    assert exact_fps(59.94) == Fraction(60000, 1001)
    assert exact_fps(12.0) == 12 and exact_fps(25.0) == 25 and exact_fps(30.0) == 30


def test_one_euro_filter_smooths_jitter_but_follows_motion():
    rng = np.random.default_rng(0)
    f = OneEuroFilter(min_cutoff=1.0, beta=1.0)
    still = [f(np.array([100.0]) + rng.normal(0, 1.5, 1), 1 / 25, unit=50)[0] for _ in range(100)]
    assert np.std(np.diff(still[20:])) < 0.5 * np.std(np.diff(rng.normal(0, 1.5, 100)))
    g = OneEuroFilter(min_cutoff=1.0, beta=1.0)
    moving = [g(np.array([10.0 * i]), 1 / 25, unit=50)[0] for i in range(60)]
    assert abs(moving[-1] - 590) < 15, "lag stays small while moving"


def test_smoother_tracks_faces_by_iou():
    rng = np.random.default_rng(1)
    sm = LandmarkSmoother(fps=25)
    base = [np.array([[40, 50], [60, 50], [50, 60], [42, 70], [58, 70]], float),
            np.array([[240, 50], [260, 50], [250, 60], [242, 70], [258, 70]], float)]
    raw_a, out_a = [], []
    for t in range(40):
        dets = [Detection([b[:, 0].min() - 10, 35, b[:, 0].max() + 10, 85], 0.9, b + rng.normal(0, 1.0, b.shape))
                for b in base]
        if t % 2:
            dets = dets[::-1]  # detection order changes between frames
        res = sm(dets)
        assert len(res) == 2
        a = next(r for r, d in zip(res, dets) if d.landmarks[0, 0] < 150)
        raw_a.append(next(d for d in dets if d.landmarks[0, 0] < 150).landmarks)
        out_a.append(a.landmarks)
    assert all(o[0, 0] < 150 for o in out_a), "tracks never swap"
    jitter_raw = np.abs(np.diff(np.array(raw_a[10:]), axis=0)).mean()
    jitter_out = np.abs(np.diff(np.array(out_a[10:]), axis=0)).mean()
    assert jitter_out < 0.5 * jitter_raw
