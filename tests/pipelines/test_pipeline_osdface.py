"""OSDFacePipeline: the official math, batching, dtypes, I/O types and save/load round trips."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from osdface.image import ImageError
from osdface.pipelines import OSDFacePipeline


def official_forward(pipe, images_uint8):
    """The official ``infer.py`` forward written out step by step (batch 1, fp32, posterior mode)."""
    outs = []
    for img in images_uint8:
        lq = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).unsqueeze(0) * 2 - 1  # ToTensor, *2-1
        if lq.shape[2] == lq.shape[3]:
            lq = F.interpolate(lq, (pipe.resolution,) * 2, mode="bilinear", align_corners=True)
        # VRE wrapper: resize (identity at the model size), second normalisation, encoder, selection
        v = F.interpolate(lq, size=(pipe.resolution,) * 2, mode="bilinear", align_corners=False)
        v = (v - 0.5) / 0.5
        h = pipe.vre.quant_conv(pipe.vre.encoder(v))
        cb = pipe.vre.quantize.embedding.weight
        z = h.permute(0, 2, 3, 1).contiguous().view(1, -1, cb.shape[1])
        d = torch.sum(z**2, dim=2, keepdim=True) + torch.sum(cb**2, dim=1) - 2 * torch.matmul(z, cb.t())
        mv, mi = torch.min(d, dim=2)
        order = torch.sort(mv[0]).indices
        sel = []
        for c in mi[0][order].tolist():
            if c not in sel:
                sel.append(c)
            if len(sel) >= pipe.vre.config.num_tokens:
                break
        enc = torch.zeros(pipe.vre.config.num_tokens, cb.shape[0])
        enc[: len(sel)].scatter_(1, torch.tensor(sel).unsqueeze(1), 1)
        prompt = pipe.prompt_adapter(torch.matmul(enc, cb).unsqueeze(0))
        lat = pipe.vae.encode(lq).latent_dist.mode() * pipe.vae.config.scaling_factor
        eps = pipe.unet(lat, 399, encoder_hidden_states=prompt).sample
        ac = pipe.scheduler.alphas_cumprod.double()[399]
        x0 = ((lat.double() - (1 - ac) ** 0.5 * eps.double()) / ac**0.5).float()
        out = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample.clamp(-1, 1) * 0.5 + 0.5
        outs.append(out.clamp(0, 1))
    return torch.cat(outs)


@torch.no_grad()
def test_matches_official_math_exactly(tiny_pipe, faces):
    for i in range(2):  # the official script runs batch 1: same ops, same order -> bit-identical
        ours = tiny_pipe(faces[i : i + 1]).images
        assert ours.shape == (1, 3, 64, 64) and ours.dtype == torch.float32
        assert torch.equal(ours, official_forward(tiny_pipe, faces[i : i + 1]))
    # batched: equal up to float summation order of the batched kernels
    assert torch.allclose(tiny_pipe(faces[:2]).images, official_forward(tiny_pipe, faces[:2]), atol=1e-4)


@torch.no_grad()
def test_square_resize_rule(tiny_pipe, faces):
    big = np.asarray(Image.fromarray(faces[0]).resize((96, 96), Image.BICUBIC))
    ours = tiny_pipe(big).images
    assert ours.shape == (1, 3, 64, 64)
    assert torch.equal(ours, official_forward(tiny_pipe, [big]))


def test_batch_equals_single(tiny_pipe, faces):
    batch = tiny_pipe(faces).images
    single = torch.cat([tiny_pipe(f).images for f in faces])
    assert torch.allclose(batch, single, atol=1e-4)


def test_input_types_agree_and_output_types(tiny_pipe, faces):
    t = torch.from_numpy(faces[:2]).permute(0, 3, 1, 2).float() / 255
    a = tiny_pipe(t).images
    b = tiny_pipe([Image.fromarray(f) for f in faces[:2]]).images
    c = tiny_pipe(list(faces[:2])).images
    assert torch.equal(a, b) and torch.equal(a, c)
    # "np": diffusers' float32 (B, H, W, 3) in [0, 1], the "pt" values themselves (issue 17)
    np_out = tiny_pipe(faces[:2], output_type="np").images
    assert isinstance(np_out, np.ndarray) and np_out.dtype == np.float32 and np_out.shape == (2, 64, 64, 3)
    assert np.array_equal(np_out, a.permute(0, 2, 3, 1).numpy())
    assert np_out.min() >= 0.0 and np_out.max() <= 1.0 and np.unique(np_out * 255 % 1).size > 2  # not levels
    u8 = tiny_pipe(faces[:2], output_type="uint8").images
    assert u8.dtype == np.uint8 and u8.shape == (2, 64, 64, 3)
    assert np.array_equal(u8, np.round(a.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
    trunc = tiny_pipe(faces[:2], output_type="uint8", rounding="truncate").images
    assert np.array_equal(trunc, np.floor(a.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
    pil = tiny_pipe(faces[0], output_type="pil").images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (64, 64) and pil[0].mode == "RGB"


def test_latent_mode_deterministic_and_sampling_seeded(tiny_pipe, faces):
    assert torch.equal(tiny_pipe(faces[:1]).images, tiny_pipe(faces[:1]).images)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    s1 = tiny_pipe(faces[:1], latent="sample", generator=g()).images
    s2 = tiny_pipe(faces[:1], latent="sample", generator=g()).images
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, tiny_pipe(faces[:1]).images)


def test_bad_inputs_raise_clear_errors(tiny_pipe):
    with pytest.raises(ImageError, match="square"):
        tiny_pipe(np.zeros((64, 48, 3), np.uint8))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        tiny_pipe(torch.full((1, 3, 64, 64), 2.0))
    with pytest.raises(ImageError, match="RGB"):
        tiny_pipe(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ImageError, match="same size"):
        tiny_pipe([np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)])


def test_output_differs_with_lora_and_prompt(tiny_pipe, faces):
    """The prompt and the LoRA both reach the output (guards against a pipeline that ignores them)."""
    from osdface.testing import tiny_pipeline

    no_lora = tiny_pipeline(0, with_lora=False)
    assert not torch.allclose(tiny_pipe(faces[:1]).images, no_lora(faces[:1]).images, atol=1e-3)
    lq = tiny_pipe.preprocess(faces[:1])
    with torch.no_grad():
        z = tiny_pipe.encode_latent(lq)
        p = tiny_pipe.encode_prompt(lq)
        e1 = tiny_pipe.unet(z, 399, encoder_hidden_states=p).sample
        e2 = tiny_pipe.unet(z, 399, encoder_hidden_states=torch.zeros_like(p)).sample
    assert not torch.allclose(e1, e2, atol=1e-4)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_runs_close_to_fp32(official_layout, tiny_vre_config, faces, dtype):
    ref = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config)
    half = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config, torch_dtype=dtype)
    assert half.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    out = half(faces[:2]).images
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref(faces[:2]).images).abs().mean() < 0.03
    _, idx_ref = ref.vre(ref.preprocess(faces[:2]), return_indices=True)
    idx_half = half(faces[:2]).prompt_indices
    for a, b in zip(idx_half.tolist(), idx_ref.tolist()):  # half-precision features may flip near-ties only
        sa, sb = {c for c in a if c >= 0}, {c for c in b if c >= 0}
        assert len(sa & sb) >= 0.75 * len(sb) and a[:3] == b[:3]


def test_save_load_roundtrip_fused_and_unfused(tmp_path, official_layout, tiny_vre_config, tiny_pipe, faces):
    ref = tiny_pipe(faces[:2]).images
    tiny_pipe.save_pretrained(tmp_path / "fused")
    files = sorted(p.name for p in (tmp_path / "fused").rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]  # no pickles
    assert torch.equal(OSDFacePipeline.from_pretrained(tmp_path / "fused")(faces[:2]).images, ref)

    unfused = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config, fuse_lora=False)
    assert unfused.unet.peft_config  # LoRA kept as a peft adapter
    assert torch.allclose(unfused(faces[:2]).images, ref, atol=1e-4)
    unfused.save_pretrained(tmp_path / "adapter", fuse_lora=False)
    assert (tmp_path / "adapter" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert torch.equal(OSDFacePipeline.from_pretrained(tmp_path / "adapter")(faces[:2]).images, ref)
    kept = OSDFacePipeline.from_pretrained(tmp_path / "adapter", fuse_lora=False)
    assert kept.unet.peft_config and torch.allclose(kept(faces[:2]).images, ref, atol=1e-4)


def test_to_moves_and_casts(official_layout, tiny_vre_config):
    pipe = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config)
    pipe.to("cpu", "bf16")
    assert all(p.dtype == torch.bfloat16 for m in pipe.modules().values() for p in m.parameters())
    assert pipe.device.type == "cpu"
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        pipe.to(dtype="fp8")


def test_speed_options_keep_outputs(official_layout, tiny_vre_config, faces):
    """channels-last and VAE chunking change only the float summation order."""
    pipe = OSDFacePipeline.from_official(*official_layout, vre_config=tiny_vre_config)
    ref = pipe(faces).images
    pipe.set_vae_batch_size(1)
    chunked = pipe(faces).images
    assert torch.allclose(chunked, ref, atol=1e-4)
    pipe.set_vae_batch_size(None).enable_channels_last()
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(pipe(faces).images, ref, atol=1e-4)
    with pytest.raises(ValueError):
        pipe.set_vae_batch_size(0)
