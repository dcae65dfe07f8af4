"""CUDA / MPS checks (deselected by default: ``pytest -m gpu``); run on a lent GPU machine."""

import pytest
import torch

from osdface.pipelines import OSDFacePipeline


def _find_accelerator():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return None


ACCEL = _find_accelerator()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(ACCEL is None, reason="no CUDA or MPS device")]


def _accelerator():
    return ACCEL


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_accelerator_matches_cpu(official_layout, tiny_vre_config, faces, dtype):
    dev = _accelerator()
    if dev == "mps" and dtype == "bf16":
        pytest.skip("bf16 on MPS is not supported by every macOS")
    cpu = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config)
    acc = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config, device=dev, torch_dtype=dtype)
    ref = cpu(faces).images
    out = acc(faces).images
    assert out.device.type == dev and torch.isfinite(out).all()
    tol = 2e-3 if dtype == "fp32" else 3e-2  # TF32 / half precision
    assert (out.cpu() - ref).abs().mean() < tol
    batch1 = torch.cat([acc(f).images for f in faces])
    assert (batch1 - out).abs().max() < (1e-3 if dtype == "fp32" else 2e-2)


def test_sampling_generator_on_device(official_layout, tiny_vre_config, faces):
    dev = _accelerator()
    pipe = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config, device=dev)
    g = lambda: torch.Generator(device=dev).manual_seed(3)  # noqa: E731
    a = pipe(faces[:2], latent="sample", generator=g()).images
    b = pipe(faces[:2], latent="sample", generator=g()).images
    assert torch.equal(a, b)


def test_encoder_overlap_on_cuda_keeps_outputs(official_layout, tiny_vre_config, faces):
    if ACCEL != "cuda":
        pytest.skip("CUDA streams only")
    pipe = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config, device="cuda")
    ref = pipe(faces)
    pipe.enable_encoder_overlap()
    assert pipe.plan.resolve(pipe.device, grad_enabled=False).encoder_overlap
    for _ in range(3):  # repeated: blocks recycled across streams must not be overwritten early
        out = pipe(faces)
        assert torch.equal(out.images, ref.images)
        assert torch.equal(out.prompt_indices, ref.prompt_indices)


def test_model_cpu_offload_moves_one_stage_at_a_time(official_layout, tiny_vre_config, faces):
    """enable_model_cpu_offload(): each stage's modules are on the accelerator while it runs and every
    other stage's are on the CPU; afterwards all rest on the CPU; outputs are the resident pipeline's."""
    from osdface.errors import InvalidSettingError

    dev = _accelerator()
    resident = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config, device=dev)
    ref = resident(image=faces).images.cpu()
    pipe = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config).enable_model_cpu_offload()
    assert pipe.device.type == dev
    stages = pipe.offload_stages()
    seen = {}

    def probe(name):
        def hook(mod, args):
            seen[name] = {other: {p.device.type for m in mods for p in m.parameters()}
                          for other, mods in stages.items()}
        return hook

    firsts = {"visual_prompt": pipe.vre, "vae_encoder": pipe.vae.encoder.conv_in, "unet": pipe.unet,
              "vae_decoder": pipe.vae.decoder.conv_in}
    hooks = [m.register_forward_pre_hook(probe(name)) for name, m in firsts.items()]
    try:
        out = pipe(image=faces).images
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == set(stages)
    for name, devices in seen.items():
        for other, types in devices.items():
            assert types == ({dev} if other == name else {"cpu"}), (name, other, types)
    assert {p.device.type for m in pipe.modules().values() for p in m.parameters()} == {"cpu"}
    assert out.device.type == dev and (out.cpu() - ref).abs().max() <= 1e-5
    with pytest.raises(InvalidSettingError, match="after enable_model_cpu_offload"):
        pipe.to(dev)
