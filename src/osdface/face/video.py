"""Video restoration: every frame through the face layer, with landmark smoothing across frames.

* Frames are read and written with imageio-ffmpeg's maintained reader and writer
  (:func:`imageio_ffmpeg.read_frames` / :func:`imageio_ffmpeg.write_frames`, the ``face`` extra; the
  ffmpeg binary is the wheel's own, or ``$IMAGEIO_FFMPEG_EXE``).
* Frame rate: kept (the reader's rate; NTSC rates such as 29.97 are written as 30000/1001).
* Rotation: ffmpeg applies a clip's rotation (display matrix / ``rotate`` tag) while decoding
  (``-autorotate``), so frames reach the face layer upright (faces are found in upright frames)
  and are written upright, with no rotation tag: the output displays as the source does.
* Audio: the source's first audio track is muxed into the output (copied when the codec fits MP4,
  AAC otherwise), cut to the video's length.
* Faces are tracked frame to frame by box IoU; each track's landmarks (and box) go through a
  One-Euro filter (Casiez et al., CHI 2012) in face-size-normalised units, so the alignment
  does not jitter when the face is still and still follows fast motion (field.md theme 5).
* Output: H.264 (CRF 18, yuv420p, sides rounded down to even), written to a temporary file that
  replaces ``dst`` only once complete (:func:`osdface.utils.io.atomic_path`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from ..utils.io import atomic_path
from ..utils.logging import get_logger
from ..utils.optional import require_package
from .types import Detection

logger = get_logger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")

#: audio codecs copied into the MP4 output as they are; others are re-encoded to AAC
MP4_AUDIO_CODECS = ("aac", "mp3", "ac3", "eac3", "alac", "opus")
#: the frame rate used when the reader reports none (some streams carry no rate)
DEFAULT_FPS = 25.0


def _imageio_ffmpeg():
    """The ``imageio_ffmpeg`` module, or :class:`InvalidSettingError` naming the extra to install."""
    return require_package("imageio_ffmpeg", "face", "reading and writing videos", package="imageio-ffmpeg")


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary imageio-ffmpeg runs (its wheel's, or ``$IMAGEIO_FFMPEG_EXE``)."""
    return _imageio_ffmpeg().get_ffmpeg_exe()


def exact_fps(fps: float) -> Fraction:
    """The frame rate as a fraction: NTSC rates (ffmpeg prints 30000/1001 as ``29.97``) exactly,
    others as the closest small fraction."""
    for base in (24, 30, 48, 60, 120):
        ntsc = Fraction(base * 1000, 1001)
        if abs(fps - float(ntsc)) < 0.006:
            return ntsc
    return Fraction(fps).limit_denominator(1001)


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
    """What the reader reports about a clip (:func:`probe_video`).

    ``width`` × ``height`` is the size of the frames :func:`read_frames` yields, i.e. upright (after
    the rotation ffmpeg applies); ``coded_size`` is the stream's stored ``(width, height)``, which
    differs for a clip rotated by ±90°. ``frames`` is ``round(fps × duration)``, an estimate (0
    when either is unknown). ``audio_codec`` is the first audio track's codec, ``None`` without one.
    """

    fps: float
    width: int
    height: int
    frames: int
    coded_size: tuple[int, int] = (0, 0)
    audio_codec: str | None = None


def _open_reader(path: str | os.PathLike) -> tuple[Iterator[bytes], dict]:
    """imageio-ffmpeg's frame generator (upright RGB24 frames) and its metadata; ``ValueError``
    naming ``path`` when ffmpeg cannot open it or it has no video stream."""
    reader = _imageio_ffmpeg().read_frames(str(path), pix_fmt="rgb24", input_params=["-autorotate"])
    try:
        meta = next(reader)
    except OSError as e:  # imageio-ffmpeg: "Could not load meta information" + ffmpeg's log, whose last line says why
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"{path}: cannot open video ({lines[-1] if lines else type(e).__name__})") from None
    return reader, meta


def _info(meta: dict) -> VideoInfo:
    fps = float(meta.get("fps") or 0.0)
    if not math.isfinite(fps) or fps <= 0:
        fps = DEFAULT_FPS
    w, h = meta["size"]
    duration = float(meta.get("duration") or 0.0)
    return VideoInfo(fps, int(w), int(h), int(round(fps * duration)) if duration > 0 else 0,
                     tuple(meta.get("source_size", (w, h))), meta.get("audio_codec"))


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame rate, upright size, estimated frame count and audio codec of a clip (reads the header
    only); ``ValueError`` naming ``path`` when ffmpeg cannot open it."""
    reader, meta = _open_reader(path)
    reader.close()
    return _info(meta)


def read_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Yield ``(H, W, 3)`` uint8 RGB frames, upright (ffmpeg applies the clip's rotation)."""
    reader, meta = _open_reader(path)
    w, h = meta["size"]
    try:
        for raw in reader:
            yield np.frombuffer(raw, np.uint8).reshape(h, w, 3).copy()  # writable, as the face layer expects
    finally:
        reader.close()


class _VideoWriter:
    """H.264 frames (+ the audio of ``audio_src``) through :func:`imageio_ffmpeg.write_frames`."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int], audio_src: Path | None = None,
                 audio_codec: str | None = None, crf: int = 18) -> None:
        self.path, self.size = path, size
        params = ["-crf", str(crf), "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2"]  # yuv420p needs even sides
        audio = {}
        if audio_src is not None:
            audio = {"audio_path": str(audio_src), "audio_codec": "copy" if audio_codec in MP4_AUDIO_CODECS else "aac"}
            params += ["-shortest"]
        self._gen = _imageio_ffmpeg().write_frames(
            str(path), size, pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=exact_fps(fps), quality=None,
            codec="libx264", macro_block_size=1, ffmpeg_log_level="error", output_params=params, **audio)
        self._gen.send(None)  # starts ffmpeg

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape[1::-1] != self.size:
            raise ValueError(f"frame size {rgb.shape[1::-1]} != video size {self.size}")
        self._gen.send(np.ascontiguousarray(rgb, dtype=np.uint8))

    def close(self) -> None:
        """Finish the file (waits for ffmpeg)."""
        self._gen.close()


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
    audio = info.audio_codec is not None
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
                    writer = _VideoWriter(tmp, info.fps, (img.shape[1], img.shape[0]), src if audio else None,
                                          info.audio_codec)
                writer.write(img)
                n += 1
                if progress is not None:
                    progress(n)
        finally:
            if writer is not None:
                writer.close()
        if n == 0:
            raise ValueError(f"{src}: no frames could be read")
        _check_written(tmp, dst, audio)
    return VideoResult(dst, n, info.fps, frame_dets, audio, failed)


def _check_written(tmp: Path, dst: Path, audio: bool) -> None:
    """The writer does not report ffmpeg's exit status: read the finished file's header back (a
    video stream, and an audio stream when one was muxed in) before it replaces ``dst``."""
    try:
        out = probe_video(tmp)
    except ValueError:
        raise RuntimeError(f"ffmpeg failed writing {dst} (its messages are above)") from None
    if audio and out.audio_codec is None:
        raise RuntimeError(f"ffmpeg wrote {dst} without the source's audio track (its messages are above)")
