"""Plain data passed between the stages of the face layer (detection → alignment → paste-back).

Coordinates are always in **input-image pixels** (x to the right, y down, pixel centres at
integer coordinates, as OpenCV), unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detection:
    """One detected face.

    Attributes:
        box: ``(4,)`` float ``[x0, y0, x1, y1]`` in input pixels.
        score: detector confidence in [0, 1].
        landmarks: ``(5, 2)`` float ``(x, y)``: the eye on the image's left, the eye on the image's
            right, nose tip, left mouth corner, right mouth corner (the FFHQ template's order).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    def __post_init__(self) -> None:
        self.box = np.asarray(self.box, dtype=np.float64).reshape(4)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float64).reshape(5, 2)
        self.score = float(self.score)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])

    def to_json(self) -> dict:
        """``{"box": [x0, y0, x1, y1], "score": s, "landmarks": [[x, y] × 5]}`` (rounded to 0.01 px)."""
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(self.score, 4),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }


@dataclass
class FaceCrop:
    """One face through the restoration.

    Attributes:
        detection: where the face was found (input pixels).
        affine: ``(2, 3)`` similarity transform input pixels → crop pixels.
        inverse_affine: ``(2, 3)`` crop pixels → input pixels.
        lq: ``(S, S, 3)`` uint8 RGB aligned input crop.
        restored: ``(S, S, 3)`` uint8 RGB restored crop (after the colour fix), or ``None`` before
            restoration.
        mask: ``(S, S)`` float32 paste mask in crop space (1 = restored face), or ``None``.
        identity: cosine identity similarity between ``lq`` and ``restored`` (SFace,
            :mod:`osdface.face.identity`), or ``None`` when the check is off.
        identity_flagged: the similarity is below the restorer's ``min_identity``.
        kept_original: a flagged face whose ``restored`` crop was replaced by ``lq``
            (``keep_original_below``).
    """

    detection: Detection
    affine: np.ndarray
    inverse_affine: np.ndarray
    lq: np.ndarray
    restored: np.ndarray | None = None
    mask: np.ndarray | None = None
    identity: float | None = None
    identity_flagged: bool = False
    kept_original: bool = False

    def to_json(self) -> dict:
        """The detection's JSON (:meth:`Detection.to_json`) plus, when the identity check ran,
        ``"identity"`` (rounded to 1e-4), ``"identity_flagged"`` and ``"kept_original"``."""
        out = self.detection.to_json()
        if self.identity is not None:
            out.update(identity=round(self.identity, 4), identity_flagged=self.identity_flagged,
                       kept_original=self.kept_original)
        return out


@dataclass
class RestoreResult:
    """The output of :meth:`osdface.face.FaceRestorer.restore` for one photo.

    Attributes:
        image: ``(H·s, W·s, 3)`` uint8 RGB restored photo (``s`` = upscale), or ``None`` when
            paste-back was switched off.
        alpha: ``(H·s, W·s)`` uint8 alpha channel when the input had one, else ``None``.
        faces: per-face results, in detection order (highest score first).
        upscale: the output scale factor.
        input_size: ``(H, W)`` of the input.
    """

    image: np.ndarray | None
    faces: list[FaceCrop] = field(default_factory=list)
    alpha: np.ndarray | None = None
    upscale: float = 1
    input_size: tuple[int, int] = (0, 0)

    def to_tensor(self):
        """The photo as a ``(1, 3, H, W)`` float32 tensor in [0, 1]."""
        from ..image import to_tensor

        if self.image is None:
            raise ValueError("no photo: paste-back was switched off")
        return to_tensor(self.image)
