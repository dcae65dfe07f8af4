"""The fidelity knob and the advanced (timestep, latent strength) pair of OSDFacePipeline (issue 17),
and the diffusers call conventions (``image=``, ``return_dict=False``)."""

import json

import numpy as np
import pytest
import torch

from osdface.errors import InvalidSettingError
from osdface.pipelines.pipeline_osdface import blend_fidelity

WS = (0.0, 0.25, 0.5, 0.75, 1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -10 * torch.log10(((a - b) ** 2).mean(dim=(1, 2, 3)))


def test_fidelity_zero_is_todays_output_bit_for_bit(tiny_pipe, faces):
    today = tiny_pipe(faces).images
    assert torch.equal(tiny_pipe(faces, fidelity=0).images, today)
    assert torch.equal(tiny_pipe(faces, fidelity=0.0, timestep=399, latent_strength=1.0).images, today)
    assert torch.equal(tiny_pipe(image=faces).images, today)


def test_fidelity_is_monotone_in_psnr_to_the_lq(tiny_pipe, faces):
    lq = tiny_pipe.preprocess(faces).add(1).div(2)  # the LQ at the model resolution, [0, 1]
    curves = torch.stack([psnr(tiny_pipe(faces, fidelity=w).images, lq) for w in WS[:-1]], dim=1)
    assert (curves.diff(dim=1) > 0).all(), curves  # strictly rising for every face
    assert torch.allclose(tiny_pipe(faces, fidelity=1).images, lq, atol=1e-6)


def test_fidelity_is_the_documented_blend(tiny_pipe, faces):
    r = tiny_pipe(faces).images
    lq = tiny_pipe.preprocess(faces).add(1).div(2)
    assert torch.allclose(tiny_pipe(faces, fidelity=0.3).images, (0.7 * r + 0.3 * lq).clamp(0, 1), atol=1e-6)
    assert blend_fidelity(r, lq, 0.0) is r


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "high"])
def test_fidelity_out_of_range_is_refused(tiny_pipe, faces, bad):
    with pytest.raises(InvalidSettingError, match="fidelity"):
        tiny_pipe(faces[:1], fidelity=bad)


def test_latent_strength_and_timestep(tiny_pipe, faces):
    with torch.no_grad():
        lq = tiny_pipe.preprocess(faces[:1])
        z = tiny_pipe.encode_latent(lq)
        recon = tiny_pipe.decode(z)
    # strength 0 = the LQ latent itself, decoded (the VAE reconstruction)
    assert torch.allclose(tiny_pipe(faces[:1], latent_strength=0).images, recon, atol=1e-5)
    half = tiny_pipe(faces[:1], latent_strength=0.5).images
    assert not torch.allclose(half, recon, atol=1e-3) and not torch.allclose(half, tiny_pipe(faces[:1]).images, atol=1e-3)
    other_t = tiny_pipe(faces[:1], timestep=200).images
    assert other_t.shape == (1, 3, 64, 64) and not torch.allclose(other_t, tiny_pipe(faces[:1]).images, atol=1e-3)
    for bad in (-1, 1000, 2.5):
        with pytest.raises(InvalidSettingError, match="timestep"):
            tiny_pipe(faces[:1], timestep=bad)
    with pytest.raises(InvalidSettingError, match="latent_strength"):
        tiny_pipe(faces[:1], latent_strength=-1)


def test_diffusers_call_conventions(tiny_pipe, faces):
    out = tiny_pipe(image=faces[:1], output_type="pt", return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (1, 3, 64, 64)
    assert torch.equal(tiny_pipe(images=faces[:1]).images, out[0])  # the old keyword still works
    with pytest.raises(InvalidSettingError, match="not both"):
        tiny_pipe(image=faces[:1], images=faces[:1])
    with pytest.raises(InvalidSettingError, match="image="):
        tiny_pipe()
    u8 = tiny_pipe(image=faces[:1], output_type="uint8").images  # uint8 under its own name
    assert u8.dtype == np.uint8 and u8.shape == (1, 64, 64, 3)
    assert np.array_equal(u8[0], np.round(out[0][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))


@pytest.mark.slow
def test_diffusers_refuses_a_model_folder_naming_the_class(tiny_pipe, tmp_path):
    """``diffusers.DiffusionPipeline.from_pretrained`` on an osdface model folder: refused, and the
    message names OSDFacePipeline (load it with ``OSDFacePipeline.from_pretrained``)."""
    import diffusers

    from osdface.pipelines import OSDFacePipeline

    folder = tiny_pipe.save_pretrained(tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "OSDFacePipeline" and not list(folder.rglob("*.py")), "JSON + safetensors only"
    with pytest.raises(AttributeError, match="module diffusers has no attribute OSDFacePipeline"):
        diffusers.DiffusionPipeline.from_pretrained(folder)
    # the list form names a class only through <file>.py inside the folder (docs/fidelity.md); without
    # one, diffusers looks the list up as an attribute: a less clear refusal, so the folders keep the string
    other = tmp_path / "list_form"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": ["osdface", "OSDFacePipeline"]}))
    with pytest.raises(TypeError, match="attribute name must be string"):
        diffusers.DiffusionPipeline.from_pretrained(other)
    assert torch.equal(OSDFacePipeline.from_pretrained(folder)(image=np.zeros((64, 64, 3), np.uint8)).images,
                       tiny_pipe(image=np.zeros((64, 64, 3), np.uint8)).images)
