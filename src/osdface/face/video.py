"""Video restoration: every frame through the face layer, with landmark smoothing across frames.

* Frames are read with OpenCV ``VideoCapture``; the frame rate is kept.
* Faces are tracked frame to frame by box IoU; each track's landmarks (and box) go through a
  One-Euro filter (Casiez et al., CHI 2012) in face-size-normalised units, so the alignment
  does not jitter when the face is still and still follows fast motion (field.md theme 5).
* Output: when an ``ffmpeg`` binary is available (``$PATH`` or the ``imageio-ffmpeg`` wheel), the
  frames are encoded to H.264 and the source's audio track (if any) is copied in; otherwise
  OpenCV writes MPEG-4 video without audio and a warning says so. The file appears atomically.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..utils.io import atomic_path
from ..utils.logging import get_logger
from .types import Detection

logger = get_logger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def find_ffmpeg() -> str | None:
    """Path of an ffmpeg binary: ``$OSDFACE_FFMPEG``, ``$PATH``, then the imageio-ffmpeg wheel."""
    env = os.environ.get("OSDFACE_FFMPEG")
    if env:
        return env if Path(env).is_file() else None
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        return exe if exe and Path(exe).is_file() else None
    except (ImportError, RuntimeError, OSError):  # not installed, or its binary is missing
        return None


class OneEuroFilter:
    """One-Euro low-pass filter on a vector signal, with derivative-adaptive cutoff.

    Args:
        min_cutoff: cutoff (Hz) when the signal is still: lower = smoother.
        beta: how fast the cutoff rises with speed (per unit of the signal per second).
        d_cutoff: cutoff of the derivative's own smoothing.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 1.0, d_cutoff: float = 1.0) -> None:
        self.min_cutoff, self.beta, self.d_cutoff = float(min_cutoff), float(beta), float(d_cutoff)
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, dt: float, unit: float = 1.0) -> np.ndarray:
        """Filter one sample ``x`` taken ``dt`` seconds after the previous; ``unit`` normalises speed."""
        x = np.asarray(x, dtype=np.float64)
        if self._x is None:
            self._x, self._dx = x.copy(), np.zeros_like(x)
            return x.copy()
        dx = (x - self._x) / dt / max(unit, 1e-9)
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * dx + (1 - a_d) * self._dx
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        a = self._alpha(cutoff, dt)
        self._x = a * x + (1 - a) * self._x
        return self._x.copy()


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class _Track:
    box: np.ndarray
    filter: OneEuroFilter
    missed: int = 0


@dataclass
class LandmarkSmoother:
    """Per-track One-Euro smoothing of detections across video frames.

    Tracks are matched greedily by box IoU (≥ ``iou_threshold``); a track survives ``max_missed``
    frames without a match. Smoothing works in units of the face's size, so the same settings
    suit small and large faces.
    """

    fps: float = 25.0
    min_cutoff: float = 1.0
    beta: float = 1.0
    iou_threshold: float = 0.3
    max_missed: int = 5
    _tracks: list[_Track] = field(default_factory=list)

    def __call__(self, detections: list[Detection]) -> list[Detection]:
        """Smooth one frame's detections (same order and count as given)."""
        dt = 1.0 / max(self.fps, 1e-3)
        free = list(range(len(self._tracks)))
        out = []
        for d in detections:
            best, best_iou = None, self.iou_threshold
            for ti in free:
                iou = box_iou(d.box, self._tracks[ti].box)
                if iou >= best_iou:
                    best, best_iou = ti, iou
            if best is None:
                track = _Track(d.box.copy(), OneEuroFilter(self.min_cutoff, self.beta))
                self._tracks.append(track)
            else:
                free.remove(best)
                track = self._tracks[best]
            track.missed = 0
            unit = math.sqrt(max(d.area, 1.0))
            sig = np.concatenate([d.landmarks.reshape(-1), d.box])
            sm = track.filter(sig, dt, unit)
            track.box = d.box.copy()
            out.append(Detection(sm[10:14], d.score, sm[:10].reshape(5, 2)))
        for ti in free:
            self._tracks[ti].missed += 1
        self._tracks = [t for t in self._tracks if t.missed <= self.max_missed]
        return out


@dataclass
class VideoInfo:
    fps: float
    width: int
    height: int
    frames: int


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame rate, size and (approximate) frame count; raises ValueError if OpenCV cannot open it."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"{path}: cannot open video")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        if not math.isfinite(fps) or fps <= 0:
            fps = 25.0
        return VideoInfo(fps, int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                         int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    finally:
        cap.release()


def read_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Yield ``(H, W, 3)`` uint8 RGB frames."""
    from ..image import bgr_to_rgb

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: cannot open video")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            yield bgr_to_rgb(frame)
    finally:
        cap.release()


def has_audio(path: str | os.PathLike, ffmpeg: str | None) -> bool:
    if not ffmpeg:
        return False
    r = subprocess.run([ffmpeg, "-hide_banner", "-i", str(path)], capture_output=True, text=True, check=False)
    return "Audio:" in r.stderr


class _VideoWriter:
    """H.264 (+ audio from ``audio_src``) through ffmpeg, else MPEG-4 through OpenCV."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int], ffmpeg: str | None,
                 audio_src: Path | None, crf: int = 18) -> None:
        self.path, self.size = path, size
        self.proc = None
        self.cv = None
        w, h = size
        if ffmpeg:
            cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                   "-s", f"{w}x{h}", "-r", f"{fps:.6f}", "-i", "-"]
            if audio_src is not None:
                cmd += ["-i", str(audio_src), "-map", "0:v:0", "-map", "1:a?", "-c:a", "aac", "-shortest"]
            even = "scale=trunc(iw/2)*2:trunc(ih/2)*2"  # yuv420p needs even sides
            cmd += ["-vf", even, "-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p", str(path)]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        else:
            self.cv = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
            if not self.cv.isOpened():
                raise RuntimeError(f"{path}: OpenCV cannot open a video writer")

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape[1::-1] != self.size:
            raise ValueError(f"frame size {rgb.shape[1::-1]} != video size {self.size}")
        if self.proc is not None:
            self.proc.stdin.write(np.ascontiguousarray(rgb).tobytes())
        else:
            self.cv.write(np.ascontiguousarray(rgb[..., ::-1]))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            err = self.proc.stderr.read().decode(errors="replace")
            if self.proc.wait() != 0:
                raise RuntimeError(f"ffmpeg failed writing {self.path}: {err.strip()[-500:]}")
        elif self.cv is not None:
            self.cv.release()


@dataclass
class VideoResult:
    """What :func:`restore_video` did."""

    output: Path
    frames: int
    fps: float
    faces_per_frame: list[list[Detection]]
    audio: bool
    failed_frames: int = 0


def restore_video(restorer, src: str | os.PathLike, dst: str | os.PathLike, smooth: bool = True,
                  progress: Callable[[int], None] | None = None) -> VideoResult:
    """Restore every frame of ``src`` into ``dst`` (a video file; ``.mp4`` recommended).

    Args:
        restorer: a :class:`~osdface.face.FaceRestorer` (its detector finds the faces per frame).
        smooth: One-Euro smoothing of landmarks across frames (recommended).
        progress: called with the number of frames done after each frame is written.

    A frame whose restoration fails is written unrestored (at the output size) and counted.
    """
    from .background import output_size
    from .restorer import PreparedPhoto

    src, dst = Path(src), Path(dst)
    info = probe_video(src)
    ffmpeg = find_ffmpeg()
    audio = has_audio(src, ffmpeg)
    if ffmpeg is None:
        logger.warning("%s: no ffmpeg binary found (install imageio-ffmpeg); writing MPEG-4 video without audio", src)
    smoother = LandmarkSmoother(fps=info.fps) if smooth else None
    frame_dets: list[list[Detection]] = []
    originals: dict[int, np.ndarray] = {}

    def prepared_frames() -> Iterator[PreparedPhoto | Exception]:
        for i, frame in enumerate(read_frames(src)):
            try:
                dets = restorer.detect(frame)
                if smoother is not None:
                    dets = smoother(dets)
                frame_dets.append(dets)
                originals[i] = frame
                yield restorer.prepare(frame, dets)
            except Exception as e:  # noqa: BLE001 - keep the frame, report at the end; traceback with -v
                logger.debug("frame %d could not be prepared", i, exc_info=True)
                frame_dets.append([])
                originals[i] = frame
                yield e

    n = failed = 0
    writer = None
    with atomic_path(dst) as tmp:
        try:
            for res in restorer.restore_many(prepared_frames()):
                frame = originals.pop(n)
                if isinstance(res, Exception) or res.image is None:
                    if isinstance(res, Exception):
                        failed += 1
                        logger.warning("%s: frame %d not restored: %s", src, n, res)
                    oh, ow = output_size(*frame.shape[:2], restorer.upscale)
                    img = cv2.resize(frame, (ow, oh), interpolation=cv2.INTER_LANCZOS4) if (oh, ow) != frame.shape[:2] else frame
                else:
                    img = res.image
                if writer is None:
                    writer = _VideoWriter(tmp, info.fps, (img.shape[1], img.shape[0]), ffmpeg, src if audio else None)
                writer.write(img)
                n += 1
                if progress is not None:
                    progress(n)
        finally:
            if writer is not None:
                writer.close()
        if n == 0:
            raise ValueError(f"{src}: no frames could be read")
    return VideoResult(dst, n, info.fps, frame_dets, audio, failed)
