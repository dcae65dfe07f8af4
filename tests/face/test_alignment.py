import cv2
import numpy as np
import pytest

from osdface.constants import FFHQ_TEMPLATE_512
from osdface.face.alignment import (
    align_face,
    estimate_affine,
    face_template,
    invert_affine,
    scale_affine_output,
    transform_points,
    warp_face,
)


def test_template_scales_with_face_size():
    np.testing.assert_allclose(face_template(512), np.array(FFHQ_TEMPLATE_512))
    np.testing.assert_allclose(face_template(64), np.array(FFHQ_TEMPLATE_512) / 8)
    with pytest.raises(ValueError):
        face_template(0)


def test_similarity_is_recovered_exactly():
    # landmarks = a known similarity image of the template → the estimate must be its inverse
    ang, s, t = np.deg2rad(23), 0.31, np.array([140.0, 75.0])
    r = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    lm = face_template(256) @ r.T + t
    a = estimate_affine(lm, 256)
    np.testing.assert_allclose(transform_points(a, lm), face_template(256), atol=1e-3)
    np.testing.assert_allclose(a[:, :2] @ r, np.eye(2), atol=1e-6)
    inv = invert_affine(a)
    np.testing.assert_allclose(transform_points(inv, face_template(256)), lm, atol=1e-3)


def test_degenerate_landmarks_fall_back_or_fail_clearly():
    with pytest.raises(ValueError, match="NaN"):
        estimate_affine(np.full((5, 2), np.nan))


def test_inverse_warp_of_forward_warp_is_identity_on_the_face(yunet, astronaut):
    d = yunet(astronaut)[0]
    crop, a = align_face(astronaut, d.landmarks, 512)
    assert crop.shape == (512, 512, 3)
    # the aligned landmarks sit on the template (a real face is not exactly template-shaped: ~2%)
    np.testing.assert_allclose(transform_points(a, d.landmarks), face_template(512), atol=12)
    back = cv2.warpAffine(crop, invert_affine(a), astronaut.shape[1::-1], flags=cv2.INTER_LINEAR)
    x0, y0, x1, y1 = d.box.astype(int)
    diff = np.abs(back[y0:y1, x0:x1].astype(float) - astronaut[y0:y1, x0:x1])
    assert diff.mean() < 2.5, diff.mean()
    # and a small crop (downscaling warp) round-trips to a blurred but faithful face
    small, a64 = align_face(astronaut, d.landmarks, 64)
    back64 = cv2.warpAffine(small, invert_affine(a64), astronaut.shape[1::-1], flags=cv2.INTER_LINEAR)
    assert np.abs(back64[y0:y1, x0:x1].astype(float) - astronaut[y0:y1, x0:x1]).mean() < 12


def test_scale_affine_output_matches_resize_of_the_warp(astronaut):
    a = estimate_affine(face_template(512) * 0.2 + 150, 64)
    inv = invert_affine(a)
    crop = warp_face(astronaut, a, 64)
    # paste at 1× then resize ×2 ≈ paste at 2× with the scaled affine (pixel-centre exact)
    x1 = cv2.warpAffine(crop, inv, (512, 512), flags=cv2.INTER_LINEAR).astype(float)
    x2 = cv2.warpAffine(crop, scale_affine_output(inv, 2), (1024, 1024), flags=cv2.INTER_LINEAR).astype(float)
    down = cv2.resize(x2, (512, 512), interpolation=cv2.INTER_AREA)
    y0, y1, xx0, xx1 = 170, 230, 170, 230
    assert np.abs(down[y0:y1, xx0:xx1] - x1[y0:y1, xx0:xx1]).mean() < 3
    shifted = cv2.warpAffine(crop, inv * 2, (1024, 1024), flags=cv2.INTER_LINEAR).astype(float)  # naive, no offset
    naive = cv2.resize(shifted, (512, 512), interpolation=cv2.INTER_AREA)
    assert np.abs(down[y0:y1, xx0:xx1] - x1[y0:y1, xx0:xx1]).mean() < np.abs(naive - x1)[y0:y1, xx0:xx1].mean()


def test_border_modes():
    img = np.full((40, 40, 3), 200, np.uint8)
    a = estimate_affine(face_template(512) * 0.2 - 30, 64)  # face in the corner: crop reaches outside
    const = warp_face(img, a, 64)
    assert tuple(const[0, 0]) == (132, 133, 135), "facexlib grey outside the photo"
    assert tuple(warp_face(img, a, 64, border="replicate")[0, 0]) == (200, 200, 200)
    with pytest.raises(ValueError, match="unknown border mode"):
        warp_face(img, a, 64, border="wrap")
