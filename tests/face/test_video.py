"""Video restoration: frames, frame rate, audio, landmark smoothing."""

import contextlib
import io
import json
import subprocess

import cv2
import numpy as np
import pytest

from osdface.cli import main
from osdface.face.types import Detection
from osdface.face.video import (
    LandmarkSmoother,
    OneEuroFilter,
    find_ffmpeg,
    has_audio,
    probe_video,
    read_frames,
)

N_FRAMES, FPS, SIZE = 6, 12.0, 192


def _frames(astronaut):
    base = cv2.resize(astronaut, (SIZE, SIZE), interpolation=cv2.INTER_AREA)  # face ≈ 35 px
    return [np.roll(base, (i, 2 * i), axis=(0, 1)) for i in range(N_FRAMES)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut):
    """A short real clip: the astronaut drifting, with a sine audio track when ffmpeg is available."""
    d = tmp_path_factory.mktemp("video")
    path = d / "clip.mp4"
    frames = _frames(astronaut)
    ffmpeg = find_ffmpeg()
    if ffmpeg:
        cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{SIZE}x{SIZE}", "-r", str(FPS), "-i", "-", "-f", "lavfi", "-i",
               f"sine=frequency=440:duration={N_FRAMES / FPS}", "-c:v", "libx264", "-qp", "0",
               "-pix_fmt", "yuv444p", "-c:a", "aac", "-shortest", str(path)]
        subprocess.run(cmd, input=b"".join(f.tobytes() for f in frames), check=True)
    else:
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIZE, SIZE))
        for f in frames:
            w.write(f[..., ::-1].copy())
        w.release()
    return path, ffmpeg


def test_video_cli_restores_every_frame_keeps_fps_and_audio(clip, tiny_model_dir, tmp_path):
    path, ffmpeg = clip
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
    if ffmpeg:
        assert has_audio(path, ffmpeg) and has_audio(result, ffmpeg), "source audio is kept"
    report = json.loads((tmp_path / "r.json").read_text())
    faces = report["images"][0]["faces"]
    assert sorted({f["frame"] for f in faces}) == list(range(N_FRAMES)), "a face in every frame"


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
