"""The execution plan: one object holds every speed/memory setting; none of them changes the math."""

import dataclasses
import logging

import pytest
import torch

from osdface.models.lean_decode import DEFAULT_BAND_MB, lean_decode_supported
from osdface.pipelines import ExecutionPlan, OSDFacePipeline
from osdface.testing import TINY_RESOLUTION, synthetic_faces, tiny_components, tiny_pipeline


def test_defaults_and_resolution_per_device():
    plan = ExecutionPlan()
    assert (plan.lean_decode, plan.lean_band_mb, plan.heap_trimming, plan.encoder_overlap, plan.channels_last,
            plan.vae_batch_size, plan.compile_mode) == (None, DEFAULT_BAND_MB, None, False, False, None, None)
    cpu = plan.resolve("cpu", grad_enabled=False)
    assert cpu.lean_decode and cpu.heap_trimming and not cpu.encoder_overlap
    cuda = plan.replace(encoder_overlap=True).resolve("cuda", grad_enabled=False)
    assert not cuda.lean_decode and not cuda.heap_trimming and cuda.encoder_overlap
    under_grad = plan.replace(encoder_overlap=True, heap_trimming=True).resolve("cuda", grad_enabled=True)
    assert not under_grad.heap_trimming and not under_grad.encoder_overlap  # never under autograd
    explicit = plan.replace(lean_decode=False, heap_trimming=False).resolve("cpu", grad_enabled=False)
    assert not explicit.lean_decode and not explicit.heap_trimming
    assert explicit.as_dict()["vae_batch_size"] is None


def test_plan_is_a_validated_value():
    plan = ExecutionPlan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.lean_decode = True
    with pytest.raises(ValueError, match="band_mb must be > 0"):
        plan.replace(lean_band_mb=0)
    with pytest.raises(ValueError, match="VAE batch size must be >= 1 or None"):
        ExecutionPlan(vae_batch_size=0)
    assert plan.replace(vae_batch_size=2) == ExecutionPlan(vae_batch_size=2)
    assert plan == ExecutionPlan()  # replace made a copy


def test_pipeline_methods_set_the_plan_and_return_the_pipeline():
    pipe = tiny_pipeline(0)
    assert pipe.plan == ExecutionPlan()
    assert pipe.set_lean_decode(True, band_mb=4) is pipe
    assert pipe.set_heap_trimming(False) is pipe
    assert pipe.enable_encoder_overlap() is pipe
    assert pipe.set_vae_batch_size(2) is pipe
    assert pipe.enable_channels_last() is pipe
    assert pipe.plan == ExecutionPlan(lean_decode=True, lean_band_mb=4.0, heap_trimming=False, encoder_overlap=True,
                                      channels_last=True, vae_batch_size=2)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    before = pipe.plan
    with pytest.raises(ValueError, match="band_mb"):
        pipe.set_lean_decode(True, band_mb=-1)
    with pytest.raises(ValueError, match="VAE batch size"):
        pipe.set_vae_batch_size(0)
    assert pipe.plan == before  # a refused setting leaves the plan as it was


def test_compile_is_recorded_and_the_compiled_decoder_is_a_documented_fallback():
    pipe = tiny_pipeline(0)
    assert pipe.compile(mode="reduce-overhead") is pipe  # torch.compile is lazy: nothing is compiled yet
    assert pipe.plan.compile_mode == "reduce-overhead"
    with torch.inference_mode():
        assert "compiled" in lean_decode_supported(pipe.vae)


def test_heap_trimming_is_owned_by_the_plan(monkeypatch):
    import osdface.pipelines.execution as execution

    calls = []
    monkeypatch.setattr(execution, "trim_heap", lambda: calls.append(1) or True)
    pipe = tiny_pipeline(1)
    faces = synthetic_faces(2, seed=5)
    ref = pipe(faces).images
    assert len(calls) == 3  # after the encoders, after the UNet (before decoding), after decoding
    calls.clear()
    assert torch.equal(pipe.set_heap_trimming(False)(faces).images, ref)
    assert not calls
    pipe.set_heap_trimming(True)
    pipe.restore_tensor(pipe.preprocess(faces))  # under autograd (training): never
    assert not calls


def test_encoders_run_prompt_then_latent_and_overlap_is_cuda_only():
    plan = ExecutionPlan(encoder_overlap=True)
    order = []
    lq = torch.zeros(1, 3, 8, 8)
    with torch.inference_mode():
        prompt, z = plan.run_encoders(lq, lambda: order.append("prompt") or (lq + 1,),
                                      lambda: order.append("latent") or lq + 2)
    assert order == ["prompt", "latent"] and prompt[0].eq(1).all() and z.eq(2).all()


def test_settings_keep_outputs():
    """Lean decode, heap trimming and the (CPU no-op) overlap: bit-identical; chunking and channels-last:
    float summation order only."""
    faces = synthetic_faces(3, seed=6)
    pipe = tiny_pipeline(2)
    ref = pipe(faces).images
    for setting in (lambda p: p.set_lean_decode(False), lambda p: p.set_heap_trimming(False),
                    lambda p: p.enable_encoder_overlap()):
        assert torch.equal(setting(tiny_pipeline(2))(faces).images, ref)
    chunked = tiny_pipeline(2).set_vae_batch_size(2).enable_channels_last()(faces).images
    torch.testing.assert_close(chunked, ref, rtol=0, atol=1e-4)


def _attention_vae_pipeline():
    """The tiny pipeline with a VAE whose up blocks carry attention: a decoder the lean path does not support."""
    from diffusers import AutoencoderKL

    comps = tiny_components(0)
    torch.manual_seed(7)
    comps["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=TINY_RESOLUTION, layers_per_block=1,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("AttnUpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )
    return OSDFacePipeline(**comps)


def test_unsupported_decoder_warns_once_and_decodes_with_vae_decode(caplog):
    faces = synthetic_faces(2, seed=8)
    plain = _attention_vae_pipeline().set_lean_decode(False)(faces).images
    pipe = _attention_vae_pipeline()  # lean decode on (auto, CPU)
    with caplog.at_level(logging.WARNING, logger="osdface"):
        outs = [pipe(faces).images for _ in range(2)]
    assert all(torch.equal(o, plain) for o in outs)
    warned = [r.getMessage() for r in caplog.records if "lean VAE decode" in r.getMessage()]
    assert len(warned) == 1 and "AttnUpDecoderBlock2D" in warned[0]
