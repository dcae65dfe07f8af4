"""Real face crops for the stage-1 tests: cut from the photos that ship with scikit-image
(astronaut, cameraman, the LFW subset), plus :func:`osdface.testing.synthetic_faces`."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

SIZE = 64


def real_face_crops(size: int = SIZE) -> np.ndarray:
    """``(7, size, size, 3)`` uint8 RGB: 2 astronaut crops, the cameraman, 4 LFW faces."""
    from skimage import data

    astro, cam, lfw = data.astronaut(), data.camera(), data.lfw_subset()
    crops = [astro[30:222, 130:322], astro[50:200, 150:300], np.repeat(cam[40:200, 150:310, None], 3, 2)]
    crops += [np.repeat((lfw[i] * 255).round().astype(np.uint8)[..., None], 3, 2) for i in range(4)]
    return np.stack([cv2.resize(np.ascontiguousarray(c), (size, size), interpolation=cv2.INTER_AREA
                                if c.shape[0] > size else cv2.INTER_CUBIC) for c in crops])


@pytest.fixture(scope="session")
def face_crops() -> np.ndarray:
    """``(9, 64, 64, 3)`` uint8: 7 real crops + 2 synthetic faces."""
    from osdface.testing import synthetic_faces

    return np.concatenate([real_face_crops(), synthetic_faces(2, SIZE, seed=5)])


def _write_faces(d, faces):
    for i, f in enumerate(faces):
        cv2.imwrite(str(d / f"face{i:02d}.png"), f[:, :, ::-1])
    return d


@pytest.fixture(scope="session")
def face_dir(tmp_path_factory, face_crops):
    """A folder of the 9 face crops (PNG)."""
    return _write_faces(tmp_path_factory.mktemp("faces"), face_crops)


@pytest.fixture(scope="session")
def small_face_dir(tmp_path_factory, face_crops):
    """A folder of 3 face crops (astronaut, cameraman, a synthetic face): short epochs."""
    return _write_faces(tmp_path_factory.mktemp("faces3"), face_crops[[0, 2, 8]])


class FixedPairs(Dataset):
    """The same (lq, gt) items every epoch (an overfit set): LQ degraded once with a fixed seed."""

    def __init__(self, faces: np.ndarray, seed: int = 0):
        from osdface.data.degradation import PRESETS, Degrader

        deg = Degrader(PRESETS["daefr"])
        self.gt = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255
        lq = [deg(f, seed + i)[0] for i, f in enumerate(faces)]
        self.lq = torch.from_numpy(np.stack(lq)).permute(0, 3, 1, 2).float() / 255

    def __len__(self):
        return len(self.gt)

    def __getitem__(self, i):
        return {"lq": self.lq[i], "gt": self.gt[i], "index": i}


@pytest.fixture
def fixed_pairs(face_crops):
    return FixedPairs(face_crops[[0, 3]])


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run the stage-1 tests on one intra-op thread: the tiny convolutions are as fast on one core,
    and far faster when the CI machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
