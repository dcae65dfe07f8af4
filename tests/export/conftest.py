"""Shared by the export and runner tests: the tiny pipeline, its model folder and its ONNX exports (once per session)."""

from __future__ import annotations

import pytest
import torch

from osdface.export.onnx import export_onnx
from osdface.testing import TINY_RESOLUTION, tiny_pipeline


@pytest.fixture(scope="session")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def static_dir(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "static"
    export_onnx(pipe, out)
    return out


@pytest.fixture(scope="session")
def dynamic_dir(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "dynamic"
    export_onnx(pipe, out, dynamic_batch=True)
    return out


@pytest.fixture(scope="session")
def model_dir(pipe, tmp_path_factory):
    """The tiny pipeline as a model folder for ``osdface restore --model`` (the torch backend)."""
    return pipe.save_pretrained(tmp_path_factory.mktemp("model") / "model")


def _random_faces(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=g)


@pytest.fixture(scope="session")
def make_faces():
    """``make_faces(n, seed=1)`` → ``(n, 3, R, R)`` random crops in [0, 1] at the tiny resolution."""
    return _random_faces


@pytest.fixture(scope="session")
def graph_case(pipe):
    """``graph_case(name)`` → ``(feeds, expected)``: the inputs of one exported graph (a batch of 2 other
    than the tracing input, through the dynamic axis) and the outputs of its PyTorch module."""
    from osdface.export.onnx import graph_modules

    modules = graph_modules(pipe)

    def case(name: str):
        image = _random_faces(2) * 2 - 1
        with torch.no_grad():
            latent = modules["vae_encoder"](image)
            prompt, _ = modules["prompt_encoder"](image)
            feeds = {"vae_encoder": {"image": image}, "prompt_encoder": {"image": image},
                     "unet": {"latent": latent, "prompt": prompt}, "vae_decoder": {"latent": latent * 1.3}}[name]
            expected = modules[name](*feeds.values())
        return feeds, expected if isinstance(expected, tuple) else (expected,)

    return case
