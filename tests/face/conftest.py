"""Real offline face photos and composites for the face-layer tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "face"

#: Face box centre and width in the source photos (pixels), as YuNet and MTCNN find them.
ASTRONAUT_FACE = {"center": (223.0, 120.0), "size": 90.0}
KODIM_FACE = {"center": (253.0, 175.0), "size": 282.0}


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="session")
def kodim() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(ASSETS / "kodim04.jpg").convert("RGB"))


def _place(canvas, src, face, scale, angle, center_xy):
    """Paste ``src`` scaled/rotated so its face lands at ``center_xy``; return the face's GT."""
    h, w = src.shape[:2]
    fx, fy = face["center"]
    m = cv2.getRotationMatrix2D((fx, fy), angle, scale)
    m[:, 2] += np.array(center_xy) - np.array([fx, fy])
    # warp the source onto the canvas through a feathered mask, so no hard rectangle edge is created
    warped = cv2.warpAffine(src, m, canvas.shape[1::-1], flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones((h, w), np.float32), m, canvas.shape[1::-1])
    mask = cv2.GaussianBlur(cv2.erode(mask, np.ones((5, 5), np.uint8)), (0, 0), 3)[..., None]
    canvas[:] = np.rint(mask * warped + (1 - mask) * canvas).astype(np.uint8)
    return {"center": np.array(center_xy, float), "size": face["size"] * scale}


def make_group_photo(astronaut, kodim, width=960, height=640, seed=0):
    """A multi-face photo: faces of both subjects at several sizes (28–120 px) and tilts (±25°)."""
    rng = np.random.default_rng(seed)
    small = cv2.resize(rng.integers(70, 190, (height // 40, width // 40, 3)).astype(np.uint8), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    canvas = cv2.GaussianBlur(small, (0, 0), 4)
    gts = []
    w, h = width, height
    for src, face, scale, angle, c in (
        (astronaut, ASTRONAUT_FACE, 1.2, 0, (0.18 * w, 0.30 * h)),
        (kodim, KODIM_FACE, 0.4, 20, (0.50 * w, 0.28 * h)),
        (astronaut, ASTRONAUT_FACE, 0.55, -25, (0.80 * w, 0.30 * h)),
        (kodim, KODIM_FACE, 0.16, 0, (0.30 * w, 0.78 * h)),
        (astronaut, ASTRONAUT_FACE, 0.8, 10, (0.70 * w, 0.76 * h)),
    ):
        gts.append(_place(canvas, src, face, scale, angle, c))
    return canvas, gts


@pytest.fixture(scope="session")
def group_photo(astronaut, kodim):
    """``(rgb (640, 960, 3) uint8, [ground truth {"center", "size"}])``."""
    return make_group_photo(astronaut, kodim)


@pytest.fixture(scope="session")
def yunet():
    from osdface.face.detection import YuNetDetector

    return YuNetDetector()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, official_layout, tiny_vre_config):
    """A converted tiny model folder for ``osdface restore --model``."""
    from osdface.pipelines import OSDFacePipeline

    d = tmp_path_factory.mktemp("tiny_model") / "model"
    OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config).save_pretrained(d)
    return d
