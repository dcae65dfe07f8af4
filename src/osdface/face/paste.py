"""Soft-mask paste-back of restored crops into the (optionally upscaled) photo.

The mask is built in **crop space**: 0 on a thin border of the crop (the "erosion", which also
removes the grey padding the alignment warp adds outside the photo), rising smoothly
(smoothstep) to 1 over a feather band, optionally multiplied by a face-parsing mask. It is then
warped back with the same inverse affine as the restored crop. Because the ramp reaches exactly
0 before the crop's edge, every output pixel outside a face's warped crop keeps the background
value **exactly**, and there is no step anywhere (no seams, cf. RestoreFormer++ #17).

Each face is warped only into the bounding box of its quad in the output, so the cost scales
with the faces' size, not with the photo's.

Overlapping faces are blended in a defined order: by box area, **smallest first**, so the larger
(usually nearer) face ends on top; ties keep detection order.
"""

from __future__ import annotations

import cv2
import numpy as np

from .alignment import scale_affine_output


def soft_mask(size: int, erode: float = 0.04, feather: float = 0.10) -> np.ndarray:
    """Crop-space paste mask ``(size, size)`` float32 in [0, 1].

    Args:
        size: crop side.
        erode: width of the zero border, as a fraction of ``size`` (≥ 1 pixel).
        feather: width of the smooth 0 → 1 ramp after the border, as a fraction of ``size``.
    """
    if not 0 <= erode < 0.5 or not 0 < feather < 0.5 or erode + feather >= 0.5:
        raise ValueError(f"need 0 ≤ erode, 0 < feather and erode + feather < 0.5; got {erode}, {feather}")
    idx = np.arange(size, dtype=np.float64) + 0.5
    dist = np.minimum(idx, size - idx)  # distance of each pixel centre to the nearest crop edge
    e = max(erode * size, 1.0)
    f = max(feather * size, 1.0)
    t = np.clip((dist - e) / f, 0.0, 1.0)
    ramp = t * t * (3 - 2 * t)  # smoothstep: C¹, zero slope at both ends
    return np.minimum(ramp[:, None], ramp[None, :]).astype(np.float32)


def _paste_one(canvas: np.ndarray, face: np.ndarray, mask: np.ndarray, inv_affine: np.ndarray) -> None:
    """Blend one crop into ``canvas`` (uint8 ``(H, W, 3)``, in place) through ``inv_affine``.

    Only the face's region of interest is converted to float, so memory stays at the output size.
    """
    h, w = canvas.shape[:2]
    s = face.shape[0]
    quad = np.array([[0, 0], [s - 1, 0], [s - 1, s - 1], [0, s - 1]], np.float64) @ inv_affine[:, :2].T + inv_affine[:, 2]
    x0 = max(int(np.floor(quad[:, 0].min())) - 2, 0)
    y0 = max(int(np.floor(quad[:, 1].min())) - 2, 0)
    x1 = min(int(np.ceil(quad[:, 0].max())) + 3, w)
    y1 = min(int(np.ceil(quad[:, 1].max())) + 3, h)
    if x1 <= x0 or y1 <= y0:
        return
    a = inv_affine.copy()
    a[:, 2] -= (x0, y0)  # warp straight into the region of interest
    size = (x1 - x0, y1 - y0)
    scale = float(np.sqrt(abs(np.linalg.det(a[:, :2]))))
    interp = cv2.INTER_CUBIC if scale > 1.0 else cv2.INTER_LINEAR
    src = face
    if scale < 0.5:  # big crop pasted small: pre-shrink to avoid aliasing
        n = max(1, round(s * scale * 1.5))
        src = cv2.resize(face, (n, n), interpolation=cv2.INTER_AREA)
        r = s / n
        a = a @ np.array([[r, 0, 0.5 * r - 0.5], [0, r, 0.5 * r - 0.5], [0, 0, 1]])
        mask = cv2.resize(mask, (n, n), interpolation=cv2.INTER_AREA)
    warped = cv2.warpAffine(src, a, size, flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    m = cv2.warpAffine(mask, a, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    m = np.clip(m, 0.0, 1.0)[..., None]
    roi = canvas[y0:y1, x0:x1].astype(np.float32)
    roi += m * (np.clip(warped, 0.0, 255.0) - roi)
    canvas[y0:y1, x0:x1] = np.clip(np.rint(roi), 0, 255).astype(np.uint8)  # unchanged where m == 0


def paste_order(areas: list[float]) -> list[int]:
    """Indices in paste order: smallest face area first, ties in detection order."""
    return sorted(range(len(areas)), key=lambda i: (areas[i], i))


def paste_faces(background: np.ndarray, faces: list[np.ndarray], inverse_affines: list[np.ndarray],
                masks: list[np.ndarray], upscale: float = 1.0, areas: list[float] | None = None) -> np.ndarray:
    """Paste restored crops into a background.

    Args:
        background: ``(H·s, W·s, 3)`` uint8 or float RGB (0–255), already upscaled by ``upscale``.
        faces: restored crops, each ``(S, S, 3)`` uint8 or float (0–255).
        inverse_affines: per face, ``(2, 3)`` crop → *input*-image pixels.
        masks: per face, ``(S, S)`` float crop-space masks in [0, 1] (:func:`soft_mask`).
        upscale: ``s``; the inverse affines are composed with the pixel-exact output scaling.
        areas: per face, the box area that decides the blending order (default: all equal).

    Returns:
        ``(H·s, W·s, 3)`` uint8 RGB. Pixels outside every face's mask equal the background.
    """
    if not (len(faces) == len(inverse_affines) == len(masks)):
        raise ValueError("faces, inverse_affines and masks must have the same length")
    canvas = np.clip(np.rint(background), 0, 255).astype(np.uint8) if background.dtype != np.uint8 else background.copy()
    order = paste_order(list(areas) if areas is not None else [0.0] * len(faces))
    for i in order:
        inv = scale_affine_output(inverse_affines[i], upscale) if upscale != 1 else np.asarray(inverse_affines[i])
        _paste_one(canvas, faces[i].astype(np.float32), masks[i].astype(np.float32), inv)
    return canvas
