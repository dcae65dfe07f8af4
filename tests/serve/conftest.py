"""Fixtures of the service tests: the tiny model folder (helpers live in ``_serve_helpers``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, official_layout, tiny_vre_config):
    """A converted tiny model folder (64-px faces) for ``--model``."""
    from osdface.pipelines import OSDFacePipeline

    d = tmp_path_factory.mktemp("tiny_model") / "model"
    OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config).save_pretrained(d)
    return d
