import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def official_layout(tmp_path_factory):
    """(base_model_dir, weights_dir) with tiny weights in the official file layout."""
    from osdface.testing import write_official_layout

    return write_official_layout(tmp_path_factory.mktemp("official"), seed=0)


@pytest.fixture(scope="session")
def tiny_vre_config():
    from osdface.testing import TINY_VRE_CONFIG

    return dict(TINY_VRE_CONFIG)


@pytest.fixture(scope="session")
def tiny_pipe(official_layout, tiny_vre_config):
    """The tiny pipeline loaded from the official layout (LoRA merged)."""
    from osdface.pipelines import OSDFacePipeline

    return OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config)


@pytest.fixture(scope="session")
def faces():
    """(4, 64, 64, 3) uint8 synthetic faces."""
    from osdface.testing import synthetic_faces

    return synthetic_faces(4, seed=1)
