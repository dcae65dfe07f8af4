"""FFHQ 5-point alignment: similarity transform to the template, warp, and inverse warp.

Pure functions on numpy arrays. Affine matrices are OpenCV ``(2, 3)`` float64 maps of *pixel
centres* (``x' = A @ [x, y, 1]``), the convention of ``cv2.warpAffine``.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..constants import FACE_SIZE, FFHQ_TEMPLATE_512

#: Fill colour of crop pixels outside the photo (facexlib's grey, RGB).
BORDER_VALUE = (132, 133, 135)

_BORDER_MODES = {
    "constant": cv2.BORDER_CONSTANT,
    "reflect": cv2.BORDER_REFLECT,
    "reflect101": cv2.BORDER_REFLECT101,
    "replicate": cv2.BORDER_REPLICATE,
}


def face_template(size: int = FACE_SIZE) -> np.ndarray:
    """The FFHQ 5-point template scaled to a ``size × size`` crop: ``(5, 2)`` float64 (x, y)."""
    if size <= 0:
        raise ValueError(f"face size must be positive, got {size}")
    return np.asarray(FFHQ_TEMPLATE_512, dtype=np.float64) * (size / 512.0)


def estimate_affine(landmarks: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """Similarity transform (rotation, uniform scale, translation) landmarks → template.

    Uses ``cv2.estimateAffinePartial2D`` with LMEDS, as facexlib; falls back to a least-squares
    fit (Umeyama) if OpenCV finds no model (e.g. degenerate landmarks).

    Args:
        landmarks: ``(5, 2)`` face landmarks in input pixels (template order).
        size: crop side.

    Returns:
        ``(2, 3)`` float64 affine input → crop.
    """
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    dst = face_template(size)
    if not np.all(np.isfinite(src)):
        raise ValueError("landmarks contain NaN or infinity")
    m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if m is None or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:, :2])) < 1e-12:
        m = _umeyama_similarity(src, dst)
    return m.astype(np.float64)


def _umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    r = u @ np.diag(d) @ vt
    var_s = (s_c**2).sum() / len(src)
    scale = (sig * d).sum() / var_s if var_s > 0 else 1.0
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of a ``(2, 3)`` affine map."""
    return cv2.invertAffineTransform(np.asarray(affine, dtype=np.float64))


def transform_points(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a ``(2, 3)`` affine to ``(N, 2)`` points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(affine)[:, :2].T + np.asarray(affine)[:, 2]


def scale_affine_output(affine: np.ndarray, scale: float) -> np.ndarray:
    """Compose ``affine`` with an output rescale by ``scale`` (pixel-centre exact).

    A pixel centre ``x`` of an image maps to ``scale·x + (scale − 1)/2`` after ``cv2.resize`` by
    ``scale``; use this to paste crops onto an upscaled background.
    """
    a = np.asarray(affine, dtype=np.float64) * scale
    a[:, 2] += 0.5 * (scale - 1.0)
    return a


def warp_face(image: np.ndarray, affine: np.ndarray, size: int = FACE_SIZE, border: str = "constant",
              interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Cut the aligned ``size × size`` crop out of ``image`` (``(H, W, C)``, any dtype OpenCV warps).

    ``border`` is one of ``constant`` (facexlib's grey), ``reflect``, ``reflect101``, ``replicate``.
    A downscaling warp (face larger than the crop) is pre-filtered with ``INTER_AREA``-like
    smoothing to avoid aliasing.
    """
    if border not in _BORDER_MODES:
        raise ValueError(f"unknown border mode {border!r}; choose from {sorted(_BORDER_MODES)}")
    affine = np.asarray(affine, dtype=np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))  # crop px per input px
    src = image
    if scale < 0.5:  # shrink by an integer-ish factor first: cleaner than bilinear decimation
        f = 1.0 / scale / 1.5
        h, w = image.shape[:2]
        nw, nh = max(1, int(round(w / f))), max(1, int(round(h / f)))
        src = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        sx, sy = nw / w, nh / h
        # input pixel x ↦ resized pixel sx·(x + 0.5) − 0.5; fold its inverse into the affine
        pre = np.array([[1 / sx, 0, 0.5 / sx - 0.5], [0, 1 / sy, 0.5 / sy - 0.5], [0, 0, 1]])
        affine = affine @ pre
    value = BORDER_VALUE if src.ndim == 3 and src.shape[2] == 3 else 0
    return cv2.warpAffine(src, affine, (size, size), flags=interpolation, borderMode=_BORDER_MODES[border],
                          borderValue=value)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = FACE_SIZE, border: str = "constant"
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(crop, affine)``: the ``size``-px FFHQ-aligned crop of the face with these landmarks."""
    affine = estimate_affine(landmarks, size)
    return warp_face(image, affine, size, border=border), affine
