"""Offline, deterministic builders of tiny OSDFace components (for tests, docs and notebooks).

Everything goes through the real classes and code paths; only the widths are small:
a 64-px face, a ×8 VAE (8×8 latent), a 2-level UNet with cross-attention width 32, a VRE with a
16-entry dictionary (so at most 16 of its 77 prompt tokens are non-zero). Nothing touches the network.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from .io.names import OFFICIAL_ADAPTER_FILE, OFFICIAL_LORA_FILE, OFFICIAL_VRE_FILE
from .models.prompt_encoder import PromptAdapter, VisualPromptEncoder

TINY_RESOLUTION = 64
TINY_CROSS_DIM = 32

#: The scheduler configuration of SD 2.1-base (only ``alphas_cumprod`` matters; docs/method.md §2.6).
SD21_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

#: Follows the release's conventions (16×16 latent grid with attention there, 77 tokens), so the
#: architecture read back from a checkpoint (``infer_vre_config``) is exactly this one.
TINY_VRE_CONFIG = dict(
    n_embed=16, embed_dim=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
    resolution=TINY_RESOLUTION, z_channels=64, num_tokens=77,
)

#: SD 2.1-base UNet architecture (865.9 M parameters) — for benchmarks with random weights.
SD21_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
)

#: SD 2.1-base VAE architecture (83.7 M parameters).
SD21_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)


def tiny_unet(seed: int = 0, cross_attention_dim: int = TINY_CROSS_DIM):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True,
    )


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=TINY_RESOLUTION, layers_per_block=1,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )


def tiny_vre(seed: int = 0, **overrides) -> VisualPromptEncoder:
    torch.manual_seed(seed)
    vre = VisualPromptEncoder(**{**TINY_VRE_CONFIG, **overrides})
    # spread the dictionary so that several distinct codes get selected
    with torch.no_grad():
        vre.quantize.embedding.weight.normal_(0, 0.5)
    return vre


def sd21_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD21_SCHEDULER_CONFIG)


def tiny_components(seed: int = 0) -> dict:
    """Tiny ``vae``, ``unet``, ``vre``, ``prompt_adapter`` (random, seeded) and the real SD 2.1 scheduler."""
    torch.manual_seed(seed + 3)
    adapter = PromptAdapter(TINY_VRE_CONFIG["embed_dim"], TINY_CROSS_DIM)
    return {
        "vae": tiny_vae(seed),
        "unet": tiny_unet(seed + 1),
        "vre": tiny_vre(seed + 2),
        "prompt_adapter": adapter,
        "scheduler": sd21_scheduler(),
    }


def tiny_lora_state_dict(unet, seed: int = 0, rank: int = 4,
                         target_modules=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_in")):
    """A random PEFT LoRA for ``unet`` in the official key layout (``unet.<module>.lora_A.weight``)."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    probe = copy.deepcopy(unet)
    probe.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=False))
    with torch.no_grad():  # make the update large enough to matter in a tiny net
        for name, p in probe.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return {f"unet.{k}": v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(probe).items()}


def tiny_pipeline(seed: int = 0, with_lora: bool = True):
    """A complete tiny :class:`~osdface.pipelines.OSDFacePipeline` (64-px faces), LoRA merged."""
    from .models.lora import merge_lora_into
    from .pipelines import OSDFacePipeline

    c = tiny_components(seed)
    if with_lora:
        merge_lora_into(c["unet"], tiny_lora_state_dict(c["unet"], seed))
    return OSDFacePipeline(**c)


def write_official_layout(root: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """Write tiny weights exactly in the official release layout.

    Returns ``(base_model_dir, weights_dir)``: an SD-style diffusers folder (scheduler/, unet/,
    vae/) and a folder with ``associate_2.ckpt`` (a Lightning-style pickle carrying an
    ``argparse.Namespace`` of hyper-parameters, the HQ branch, the LQ decoder and
    ``post_quant_conv`` besides the VRE tensors), ``embedding_change_weights.pth`` and
    ``pytorch_lora_weights.safetensors`` (PEFT keys).
    """
    from safetensors.torch import save_file

    root = Path(root)
    base, weights = root / "stable-diffusion-2-1-base", root / "OSDFace"
    c = tiny_components(seed)
    c["vae"].save_pretrained(base / "vae")
    c["unet"].save_pretrained(base / "unet")
    c["scheduler"].save_pretrained(base / "scheduler")
    weights.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {f"vqvae_LQ.{k}": v.clone() for k, v in c["vre"].state_dict().items()}
    sd["vqvae_LQ.post_quant_conv.weight"] = torch.randn(64, 32, 1, 1, generator=g)
    sd["vqvae_LQ.decoder.conv_in.weight"] = torch.randn(8, 64, 3, 3, generator=g)
    sd["vqvae.encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3, generator=g)
    sd["logit_scale"] = torch.tensor(2.659)
    ckpt = {
        "epoch": 2,
        "global_step": 1234,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": sd,
        "hyper_parameters": argparse.Namespace(n_embed=16, embed_dim=32, lr=4.5e-6),
    }
    torch.save(ckpt, weights / OFFICIAL_VRE_FILE)
    torch.save(c["prompt_adapter"].state_dict(), weights / OFFICIAL_ADAPTER_FILE)
    save_file(tiny_lora_state_dict(c["unet"], seed), str(weights / OFFICIAL_LORA_FILE))
    return base, weights


def synthetic_faces(n: int = 2, size: int = TINY_RESOLUTION, seed: int = 0) -> np.ndarray:
    """``n`` deterministic face-like uint8 RGB images ``(n, size, size, 3)`` (ellipse, eyes, mouth, noise)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        bg = rng.integers(40, 200, 3)
        img = np.empty((size, size, 3), np.uint8)
        img[:] = bg
        skin = tuple(int(v) for v in rng.integers(120, 230, 3))
        c = size // 2
        cv2.ellipse(img, (c, int(c * 1.05)), (int(size * 0.3), int(size * 0.4)), 0, 0, 360, skin, -1)
        for dx in (-1, 1):
            cv2.circle(img, (c + dx * int(size * 0.12), int(size * 0.45)), max(1, size // 20), (30, 30, 30), -1)
        cv2.ellipse(img, (c, int(size * 0.72)), (int(size * 0.12), max(1, size // 30)), 0, 0, 360, (150, 40, 50), -1)
        noise = rng.normal(0, 6, img.shape)
        out[i] = np.clip(img.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return out


def snapshot_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path → bytes): compare before/after a command to
    show that its inputs come out byte-identical."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error_line(stderr: str) -> str:
    """The CLI's error as a user sees it: exactly one ``osdface: error:`` line and no traceback
    (raises ``AssertionError`` otherwise); returns that line."""
    if "Traceback" in stderr:
        raise AssertionError(f"a traceback reached the user:\n{stderr}")
    lines = [line for line in stderr.splitlines() if line.startswith("osdface: error:")]
    if len(lines) != 1:
        raise AssertionError(f"expected one 'osdface: error:' line, got {len(lines)}:\n{stderr}")
    return lines[0]
