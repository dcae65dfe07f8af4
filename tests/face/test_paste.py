import numpy as np
import pytest

from osdface.face.alignment import estimate_affine, face_template, invert_affine
from osdface.face.paste import paste_faces, paste_order, soft_mask


def test_soft_mask_shape_range_and_smoothness():
    m = soft_mask(128)
    assert m.shape == (128, 128) and m.dtype == np.float32
    assert m[0].max() == 0 and m[:, -1].max() == 0, "zero on the crop border"
    assert m[64, 64] == 1
    row = m[64, :64]
    assert np.all(np.diff(row) >= 0), "monotone from the edge to the centre"
    assert np.abs(np.diff(m, axis=0)).max() < 0.15 and np.abs(np.diff(m, axis=1)).max() < 0.15
    with pytest.raises(ValueError):
        soft_mask(64, erode=0.3, feather=0.3)


def _face_affine(cx, cy, size, crop=64, angle=0.0):
    t = face_template(512)
    t = (t - t.mean(0)) / 512 * size
    r = np.deg2rad(angle)
    rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    return estimate_affine(t @ rot.T + [cx, cy], crop)


def test_paste_keeps_background_outside_and_has_no_step():
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 256, (200, 300, 3)).astype(np.uint8)
    a = _face_affine(150, 100, 120, angle=17)
    face = np.full((64, 64, 3), 255, np.uint8)
    out = paste_faces(bg, [face], [invert_affine(a)], [soft_mask(64)])
    assert out.shape == bg.shape and out.dtype == np.uint8
    # image-space mask: paste white onto black
    black = np.zeros_like(bg)
    m = paste_faces(black, [face], [invert_affine(a)], [soft_mask(64)])[..., 0].astype(float) / 255
    assert m.max() == 1.0
    outside = m == 0
    assert outside.mean() > 0.5
    np.testing.assert_array_equal(out[outside], bg[outside])  # exact, not approximately
    # no seam: neighbouring pixels of the mask differ by little everywhere (a hard paste steps by 1)
    step = max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())
    assert step < 0.2, step
    hard = paste_faces(black, [face], [invert_affine(a)], [np.ones((64, 64), np.float32)])[..., 0] / 255.0
    assert np.abs(np.diff(hard, axis=1)).max() > 0.5


def test_paste_at_upscale_puts_the_face_where_it_belongs():
    bg = np.zeros((100, 150, 3), np.uint8)
    a = _face_affine(75, 50, 60)
    face = np.full((64, 64, 3), 200, np.uint8)
    m1 = paste_faces(bg, [face], [invert_affine(a)], [soft_mask(64)])[..., 0].astype(float)
    up = np.zeros((300, 450, 3), np.uint8)
    m3 = paste_faces(up, [face], [invert_affine(a)], [soft_mask(64)], upscale=3)[..., 0].astype(float)
    assert m3.shape == (300, 450)
    c1 = np.array(np.nonzero(m1)).mean(1)
    c3 = np.array(np.nonzero(m3)).mean(1)
    np.testing.assert_allclose(c3, 3 * c1 + 1, atol=0.6)  # pixel-centre mapping x → 3x + 1


def test_overlapping_faces_larger_on_top():
    bg = np.zeros((200, 200, 3), np.uint8)
    small_a, big_a = _face_affine(90, 100, 70), _face_affine(110, 100, 110)
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = 255
    masks = [soft_mask(64)] * 2
    # detection order: big first, then small; pasting order must still put the big one on top
    out = paste_faces(bg, [blue, red], [invert_affine(big_a), invert_affine(small_a)], masks, areas=[110**2, 70**2])
    assert tuple(out[100, 100]) == (0, 0, 255)
    assert paste_order([5.0, 1.0, 5.0, 3.0]) == [1, 3, 0, 2]
