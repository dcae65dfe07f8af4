"""Model CPU offload (``OSDFacePipeline.enable_model_cpu_offload``, issue 17): the stages hold every weight
once, outputs are the pipeline's own, the modules rest on the CPU, and the diffusers-style refusals.
The CUDA check of the placement itself (each stage alone on the GPU) is in tests/test_gpu.py."""

import numpy as np
import pytest
import torch

from osdface.errors import DeviceError, InvalidSettingError
from osdface.pipelines.pipeline_osdface import resolve_device
from osdface.testing import synthetic_faces, tiny_pipeline


def test_offload_stages_hold_every_weight_once():
    pipe = tiny_pipeline(0)
    stages = pipe.offload_stages()
    assert list(stages) == ["visual_prompt", "vae_encoder", "unet", "vae_decoder"]  # the order they run
    staged = [id(p) for mods in stages.values() for m in mods for p in m.parameters()]
    assert len(staged) == len(set(staged)), "a weight in two stages would be moved twice"
    every = {id(p) for m in pipe.modules().values() for p in m.parameters()}
    assert set(staged) == every, "a weight in no stage would stay on the CPU while its stage runs"


@pytest.mark.parametrize("lean", [True, False])
def test_offload_keeps_outputs_and_modules_rest_on_cpu(lean):
    faces = synthetic_faces(2, seed=4)
    plain = tiny_pipeline(0).set_lean_decode(lean)
    ref = plain(image=faces, output_type="uint8").images
    ref_pt = plain(image=faces).images
    pipe = tiny_pipeline(0).set_lean_decode(lean).enable_model_cpu_offload(device="cpu")
    assert pipe.plan.offload_device == torch.device("cpu") and pipe.device == torch.device("cpu")
    assert pipe.plan.resolve("cpu").offload_device == "cpu"
    ran = []  # the decoder's first conv: the lean decode runs the decoder's layers, not its forward
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: ran.append(name))
             for name, m in (("vre", pipe.vre), ("vae_encoder", pipe.vae.encoder), ("unet", pipe.unet),
                             ("vae_decoder", pipe.vae.decoder.conv_in))]
    try:
        out = pipe(image=faces)
    finally:
        for h in hooks:
            h.remove()
    assert ran == ["vre", "vae_encoder", "unet", "vae_decoder"]
    assert torch.equal(out.images, ref_pt)
    assert np.array_equal(pipe(image=faces, output_type="uint8").images, ref)
    assert {p.device.type for m in pipe.modules().values() for p in m.parameters()} == {"cpu"}
    pipe.disable_model_cpu_offload()
    assert pipe.plan.offload_device is None and torch.equal(pipe(image=faces).images, ref_pt)


def test_offload_refusals():
    pipe = tiny_pipeline(0)
    if resolve_device("auto").type == "cpu":  # as diffusers: the default needs an accelerator
        with pytest.raises(DeviceError, match=r"enable_model_cpu_offload\(\) needs an accelerator") as e:
            pipe.enable_model_cpu_offload()
        assert "\n" not in str(e.value) and pipe.plan.offload_device is None
    else:
        assert pipe.enable_model_cpu_offload().plan.offload_device.type in ("cuda", "mps")
    with pytest.raises(InvalidSettingError, match="gpu_id=1 or an index"):
        tiny_pipeline(0).enable_model_cpu_offload(gpu_id=1, device="cpu:0")
