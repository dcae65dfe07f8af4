"""Per-face identity check with SFace (issue 17): the scorer on real faces, and in FaceRestorer."""

import cv2
import numpy as np
import pytest

from osdface.errors import InvalidSettingError
from osdface.face import FaceRestorer
from osdface.face.alignment import face_template, transform_points
from osdface.face.identity import (
    ARCFACE_TEMPLATE_112,
    SFACE_SAME_PERSON_COSINE,
    IdentityScorer,
    crop_to_sface_affine,
)
from osdface.face.restorer import align_faces


@pytest.fixture(scope="module")
def scorer():
    return IdentityScorer()


@pytest.fixture(scope="module")
def crops(yunet, kodim, astronaut):
    """FFHQ-aligned 512-px crops of the two real faces."""
    return align_faces(kodim, yunet, 512)[0].lq, align_faces(astronaut, yunet, 512)[0].lq


def test_identical_pair_and_two_different_people(scorer, crops):
    k, a = crops
    same = scorer(np.stack([k, a]), np.stack([k, a]))
    assert (same >= 0.99).all(), same
    different = float(scorer(k, a)[0])
    assert different < SFACE_SAME_PERSON_COSINE, different  # clearly lower: below OpenCV's same-person threshold
    blurred = float(scorer(k, cv2.GaussianBlur(k, (0, 0), 3))[0])
    assert different < blurred < 1.0  # a degraded copy of the same face sits in between


def test_crop_size_does_not_matter(scorer, crops):
    k = crops[0]
    small = cv2.resize(k, (256, 256), interpolation=cv2.INTER_AREA)
    assert scorer.embed(small).shape == (1, 128)
    assert float(scorer(small, small)[0]) >= 0.99
    assert float(np.sum(scorer.embed(small) * scorer.embed(k))) > 0.9  # same face, other crop size
    # the FFHQ template at the crop size lands on SFace's ArcFace template
    mapped = transform_points(crop_to_sface_affine(512), face_template(512))
    assert np.abs(mapped - ARCFACE_TEMPLATE_112).max() < 3.0  # px at 112


def test_restorer_reports_identity_and_flags(tiny_pipe, yunet, astronaut, scorer):
    plain = FaceRestorer(tiny_pipe, detector=yunet).restore(astronaut)
    assert all(f.identity is None for f in plain.faces)  # off by default
    r = FaceRestorer(tiny_pipe, detector=yunet, identity=scorer)
    res = r.restore(astronaut)
    np.testing.assert_array_equal(res.image, plain.image)  # the check does not change the output
    f = res.faces[0]
    assert -1 <= f.identity <= 1 and not f.identity_flagged
    assert np.isclose(f.identity, float(scorer(f.lq, f.restored)[0]))
    # a threshold above every similarity flags the face; keep_original pastes the LQ crop back
    flagged = FaceRestorer(tiny_pipe, detector=yunet, identity=scorer, min_identity=1.0).restore(astronaut)
    assert flagged.faces[0].identity_flagged and not flagged.faces[0].kept_original
    np.testing.assert_array_equal(flagged.image, plain.image)
    kept = FaceRestorer(tiny_pipe, detector=yunet, identity=scorer, min_identity=1.0,
                        keep_original_below=True).restore(astronaut)
    fk = kept.faces[0]
    assert fk.kept_original and np.array_equal(fk.restored, fk.lq)
    assert np.abs(kept.image.astype(int) - astronaut).mean() < np.abs(plain.image.astype(int) - astronaut).mean()


def test_identity_settings_are_checked(tiny_pipe, yunet):
    with pytest.raises(InvalidSettingError, match="min_identity"):
        FaceRestorer(tiny_pipe, detector=yunet, min_identity=2)
    with pytest.raises(InvalidSettingError, match="min_identity"):
        FaceRestorer(tiny_pipe, detector=yunet, keep_original_below=True)
    with pytest.raises(InvalidSettingError, match="recogniser"):
        FaceRestorer(tiny_pipe, detector=yunet, identity="arcface")
    assert isinstance(FaceRestorer(tiny_pipe, detector=yunet, min_identity=0.3).identity, IdentityScorer)
