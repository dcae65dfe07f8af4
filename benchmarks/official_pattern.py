"""The official OSDFace ``infer.py`` execution pattern, re-created on our components for side-by-side timing.

Per image (batch 1 only, as the official script): PIL decode → ``to_tensor`` → device → ``*2-1`` →
square resize → VRE wrapper (resize, second normalisation, encoder, the per-sample Python selection loop
with ``.item()`` calls, one-hot matmul) and VAE encode (on two CUDA streams when on CUDA, then a device
sync) → UNet at t=399 → x0 in float64 → decode → clamp → CPU → truncating ``ToPILImage``. The
``perfcount`` wrapper's ``gc.collect()`` + ``empty_cache`` before and after every forward is included,
because it is part of what the official script costs per image. The latent uses the posterior mode
(the official ``sample()`` is unseeded) so outputs can be compared with ours.
"""

from __future__ import annotations

import gc

import numpy as np
import torch
import torch.nn.functional as F


def _selection_loop(h: torch.Tensor, codebook: torch.Tensor, n_min: int) -> torch.Tensor:
    z = h.permute(0, 2, 3, 1).contiguous().view(1, -1, codebook.shape[1])
    d = torch.sum(z**2, dim=2, keepdim=True) + torch.sum(codebook**2, dim=1) - 2 * torch.matmul(z, codebook.t())
    min_values, min_indices = torch.min(d, dim=2)
    buf = torch.zeros(d.shape[1], 2, device=h.device)
    buf[:, 0] = min_indices[0].to(buf.dtype)
    buf[:, 1] = min_values[0]
    _, order = torch.sort(buf[:, 1], dim=0)
    buf = buf[order]
    seen, selected = set(), []
    for idx in buf[:, 0]:
        if idx.item() not in seen:
            selected.append(idx.item())
            seen.add(idx.item())
        if len(selected) >= n_min:
            break
    enc = torch.zeros(1, n_min, codebook.shape[0], device=h.device, dtype=h.dtype)
    index = torch.tensor(selected, dtype=torch.int64, device=h.device)
    enc[0, : len(selected)].scatter_(1, index.unsqueeze(1), 1)
    return torch.matmul(enc.view(-1, codebook.shape[0]), codebook).view(1, -1, codebook.shape[1])


def _perfcount_overhead(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()


@torch.no_grad()
def official_restore_one(pipe, pil_image) -> np.ndarray:
    """One image the official way; returns the uint8 ``(H, W, 3)`` output (truncated, as ToPILImage)."""
    dev, dt, res = pipe.device, pipe.dtype, pipe.resolution
    arr = np.asarray(pil_image.convert("RGB"))
    lq = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0).to(dev, dtype=dt) * 2 - 1
    if lq.shape[2] == lq.shape[3]:
        lq = F.interpolate(lq, (res, res), mode="bilinear", align_corners=True)
    _perfcount_overhead(dev)
    cuda = dev.type == "cuda"
    s1 = torch.cuda.Stream() if cuda else None
    s2 = torch.cuda.Stream() if cuda else None
    with torch.cuda.stream(s1) if cuda else _null():
        v = F.interpolate(lq, size=(res, res), mode="bilinear", align_corners=False)
        v = (v - 0.5) / 0.5
        h = pipe.vre.quant_conv(pipe.vre.encoder(v))
        tokens = _selection_loop(h, pipe.vre.quantize.embedding.weight, pipe.vre.config.num_tokens)
        prompt = pipe.prompt_adapter(tokens)
    with torch.cuda.stream(s2) if cuda else _null():
        lat = pipe.vae.encode(lq).latent_dist.mode() * pipe.vae.config.scaling_factor
    if cuda:
        torch.cuda.synchronize()
    eps = pipe.unet(lat, pipe.timestep, encoder_hidden_states=prompt).sample
    ac = torch.as_tensor(pipe.scheduler.alphas_cumprod).to(dev).double()[pipe.timestep]
    x0 = ((lat.double() - (1 - ac) ** 0.5 * eps.double()) / ac**0.5).float()
    out = pipe.vae.decode(x0.to(dt) / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    out = (out * 0.5 + 0.5).clamp(0, 1)
    _perfcount_overhead(dev)
    return out[0].float().cpu().mul(255).byte().permute(1, 2, 0).numpy()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
