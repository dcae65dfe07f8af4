"""``paste_face_size`` (``--face-size 1024``) and the fidelity knob in FaceRestorer (issue 17)."""

import numpy as np
import pytest

from osdface.errors import InvalidSettingError
from osdface.face import FaceRestorer
from osdface.face.alignment import scale_affine_output
from osdface.face.paste import paste_faces


def _footprint(faces, masks, invs, shape):
    """Where any face's paste mask is non-zero, in image space."""
    ones = [np.full(m.shape + (3,), 255, np.uint8) for m in masks]
    return paste_faces(np.zeros(shape, np.uint8), ones, invs, masks)[..., 0] > 0


@pytest.mark.parametrize("upscale", [1, 2])
def test_1024_faces_keep_the_background_bit_exact(tiny_pipe, yunet, kodim, upscale):
    calls = []

    def upsampler(rgb, scale):  # records which images it was asked to upsample
        calls.append((rgb.shape, scale))
        from osdface.face.background import ResizeUpsampler

        return ResizeUpsampler("lanczos")(rgb, scale)

    # a large photo: the portrait upscaled 1.5x (a ~420-px face) on a 1400x1100 textured canvas
    import cv2

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (1100, 1400, 3), dtype=np.uint8)
    photo[200:776, 300:1068] = cv2.resize(kodim, (768, 576), interpolation=cv2.INTER_CUBIC)
    plain = FaceRestorer(tiny_pipe, detector=yunet, face_size=512, upscale=upscale, bg_upsampler=upsampler)
    big = FaceRestorer(tiny_pipe, detector=yunet, face_size=512, upscale=upscale, bg_upsampler=upsampler,
                       paste_face_size=1024)
    prepared = big.prepare(photo)
    assert len(prepared.faces) == 1
    restored = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)]  # paste-back under test, not the model
    calls.clear()
    a = plain.finish(plain.prepare(photo), restored)
    b = big.finish(prepared, restored)
    assert ((512, 512, 3), 2.0) in calls, "the face went through the background upsampler"
    f = b.faces[0]
    assert f.restored.shape == (512, 512, 3)
    invs = [scale_affine_output(f.inverse_affine, upscale)]
    inside = _footprint([restored[0]], [f.mask], invs, a.image.shape)
    bg = a.image.copy()
    np.testing.assert_array_equal(b.image[~inside], a.image[~inside])  # outside the face: bit-exact
    if upscale == 1:
        np.testing.assert_array_equal(b.image[~inside], photo[~inside])
    assert inside.mean() < 0.5 and (b.image[inside] != bg[inside]).any()  # the face area itself changed
    # the 1024 face is the 512 one upsampled: close to it, and not identical
    diff = np.abs(b.image.astype(int) - a.image.astype(int))[inside]
    assert 0 < diff.mean() < 40


def test_paste_face_size_below_face_size_is_refused(tiny_pipe, yunet):
    with pytest.raises(InvalidSettingError, match="paste_face_size"):
        FaceRestorer(tiny_pipe, detector=yunet, face_size=512, paste_face_size=256)


def test_restorer_fidelity(tiny_pipe, yunet, astronaut):
    prepared = FaceRestorer(tiny_pipe, detector=yunet).prepare(astronaut)
    crops = np.stack([f.lq for f in prepared.faces])
    today = FaceRestorer(tiny_pipe, detector=None, color_fix="none").restore_crops(crops)
    np.testing.assert_array_equal(  # W = 0: today's output
        FaceRestorer(tiny_pipe, detector=None, color_fix="none", fidelity=0.0).restore_crops(crops), today)
    errs = [np.mean((FaceRestorer(tiny_pipe, detector=None, color_fix="none", fidelity=w).restore_crops(crops)
                     .astype(float) - crops) ** 2) for w in (0.5, 1.0)]
    assert np.mean((today.astype(float) - crops) ** 2) > errs[0] > errs[1] and errs[1] < 1.0  # W = 1: the LQ crop
    with pytest.raises(InvalidSettingError, match="fidelity"):
        FaceRestorer(tiny_pipe, detector=yunet, fidelity=2)
