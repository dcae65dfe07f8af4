"""Memory-lean VAE decoding: the same operations as ``AutoencoderKL.decode``, run so that no
full-resolution temporary is alive longer than needed.

The SD VAE decoder's activation peak is at the last two up-blocks (256 and 128 channels at
512×512 for a 512-px face): ``Upsample2D`` materialises the nearest-neighbour ×2 image and then
convolves it (the convolution makes its own full-size working copies), and every
``ResnetBlock2D`` keeps norm, activation and convolution outputs alive at once. Here:

* 3×3 (and 1×1) convolutions at high resolution run in bands of output rows, each band reading
  its input rows plus a one-row halo (zero-padded only at the image border), written into one
  pre-allocated output. Every output element is the same sum over the same inputs; the results
  are bit-identical to the full convolution unless oneDNN picks a different kernel for the band
  shape than for the whole image (it does not for the SD VAE at 512 px: max difference 0, see
  ``benchmarks/bench_restore.py --compare-lean``; it does for tiny 8-channel test VAEs, where the
  outputs differ in float rounding only, ~1e-6).
* nearest ×2 upsampling is fused into the banded convolution (only one band is ever upsampled).
* SiLU runs in place on tensors this code owns; the residual sum is added in place
  (``a + b == b + a`` exactly in IEEE arithmetic); a block input that is only needed for its 1×1
  shortcut is taken through the shortcut first and then group-normalised in place, a few whole
  groups at a time (each group's statistics come from the same elements and kernel).

On the real SD 2.1 VAE at 512² in fp32 this lowers the decoder's extra resident memory from about
1.2 GB to about 0.7 GB (``benchmarks/bench_restore.py`` reports the process peak). Structures this
code does not recognise (a different diffusers version, other block types) fall back to the
modules' own ``forward``, one block at a time, so the result stays correct.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.logging import get_logger

logger = get_logger(__name__)

#: default working-set budget of one band, in MiB
DEFAULT_BAND_MB = 32.0


def _rows_per_band(x: torch.Tensor, band_mb: float, scale: int = 1) -> int:
    """Output rows per band so that one band of the (upsampled) input stays under ``band_mb`` MiB."""
    b, c, _, w = x.shape
    row_bytes = b * c * w * scale * x.element_size()
    return max(8, int(band_mb * 2**20 // max(row_bytes, 1)))


def _plain_conv(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.kernel_size[0] % 2 == 1
        and conv.padding == (conv.kernel_size[0] // 2,) * 2
    )


def banded_conv(conv: nn.Conv2d, x: torch.Tensor, band_mb: float = DEFAULT_BAND_MB,
                upsample: bool = False) -> torch.Tensor:
    """``conv(x)`` — or ``conv(interpolate(x, scale_factor=2, mode="nearest"))`` when ``upsample`` —
    computed in bands of output rows (same sums; see the module notes on exactness).

    Args:
        conv: a stride-1, odd-kernel, "same"-padded ``nn.Conv2d``.
        x: ``(B, C, H, W)``.
        band_mb: working-set budget of one input band in MiB.
        upsample: fuse a nearest-neighbour ×2 upsampling in front of the convolution.

    Returns:
        ``(B, C_out, H', W')`` with ``H' = 2H`` when ``upsample`` else ``H``.
    """
    if not _plain_conv(conv):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if upsample else x)
    s = 2 if upsample else 1
    h_out, w_out = x.shape[-2] * s, x.shape[-1] * s
    rows = _rows_per_band(x, band_mb, s)
    if rows >= h_out:
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if upsample else x)
    p = conv.padding[0]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    out = torch.empty((x.shape[0], conv.out_channels, h_out, w_out), dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    for r0 in range(0, h_out, rows):
        r1 = min(h_out, r0 + rows)
        a, b = max(r0 - p, 0), min(r1 + p, h_out)  # rows of the (upsampled) input this band reads
        if upsample:
            xa, xb = a // 2, (b - 1) // 2 + 1
            band = F.interpolate(x[:, :, xa:xb], scale_factor=2.0, mode="nearest")
            band = band[:, :, a - 2 * xa: a - 2 * xa + (b - a)]
        else:
            band = x[:, :, a:b]
        top, bottom = p - (r0 - a), p - (b - r1)  # zero rows only at the image border
        if top or bottom:
            band = F.pad(band, (0, 0, top, bottom))
        out[:, :, r0:r1] = F.conv2d(band, conv.weight, conv.bias, padding=(0, p), groups=conv.groups)
    return out


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


def _group_norm_(norm: nn.GroupNorm, x: torch.Tensor, band_mb: float) -> torch.Tensor:
    """``norm(x)`` written over ``x`` itself, a few whole groups at a time (bit-identical: every group's
    statistics are computed over the same elements by the same kernel)."""
    g, c = norm.num_groups, norm.num_channels
    per_group = c // g
    group_bytes = x.shape[0] * per_group * x.shape[-2] * x.shape[-1] * x.element_size()
    step = max(1, min(g, int(band_mb * 2**20 // max(group_bytes, 1))))
    for g0 in range(0, g, step):
        g1 = min(g, g0 + step)
        c0, c1 = g0 * per_group, g1 * per_group
        w = norm.weight[c0:c1] if norm.weight is not None else None
        b = norm.bias[c0:c1] if norm.bias is not None else None
        x[:, c0:c1] = F.group_norm(x[:, c0:c1], g1 - g0, w, b, norm.eps)
    return x


def _lean_resnet(block: nn.Module, holder: list[torch.Tensor], band_mb: float) -> torch.Tensor | None:
    """diffusers ``ResnetBlock2D.forward(x, None)`` (VAE flavour), or ``None`` when not that flavour.

    ``holder`` is a one-element list with ``x``; when the block has a 1×1 shortcut, ``x`` is consumed
    (the shortcut is taken first, then ``x``'s storage is normalised in place), so the caller must not
    keep another reference to it if it wants the memory back.
    """
    if (
        getattr(block, "upsample", 1) is not None or getattr(block, "downsample", 1) is not None
        or getattr(block, "time_emb_proj", 1) is not None or block.training
        or getattr(block, "time_embedding_norm", "") not in ("default", "group")  # same ops when temb is None
        or float(getattr(block, "output_scale_factor", 0.0)) != 1.0
        or not isinstance(getattr(block, "nonlinearity", None), nn.SiLU)
        or type(block.norm1) is not nn.GroupNorm
    ):
        return None
    x = holder.pop()
    if block.conv_shortcut is not None:
        shortcut = banded_conv(block.conv_shortcut, x, band_mb)
        h = _silu_(_group_norm_(block.norm1, x, band_mb))  # x is not needed any more: reuse it
    else:
        shortcut = x
        h = _silu_(block.norm1(x))
    del x
    h = banded_conv(block.conv1, h, band_mb)
    h = _silu_(block.norm2(h))  # dropout: identity in eval
    h = banded_conv(block.conv2, h, band_mb)
    return h.add_(shortcut)


def _lean_upsample(up: nn.Module, x: torch.Tensor, band_mb: float) -> torch.Tensor | None:
    """diffusers ``Upsample2D.forward(x)`` (nearest ×2 + conv), or ``None`` when not that flavour."""
    if (
        getattr(up, "norm", 1) is not None or getattr(up, "use_conv_transpose", True)
        or not getattr(up, "interpolate", False) or not getattr(up, "use_conv", False)
        or getattr(up, "name", "") != "conv"
    ):
        return None
    return banded_conv(up.conv, x, band_mb, upsample=True)


def lean_decoder_forward(decoder: nn.Module, z: torch.Tensor, band_mb: float = DEFAULT_BAND_MB) -> torch.Tensor:
    """``decoder(z)`` for a diffusers VAE ``Decoder``, with the memory-lean block implementations."""
    sample = decoder.conv_in(z)
    sample = decoder.mid_block(sample, None)
    sample = sample.to(next(iter(decoder.up_blocks.parameters())).dtype)  # older diffusers upcast here
    for up_block in decoder.up_blocks:
        for resnet in up_block.resnets:
            holder = [sample]
            del sample  # let _lean_resnet free or reuse the block input
            out = _lean_resnet(resnet, holder, band_mb)
            sample = resnet(holder.pop(), None) if out is None else out
        for upsampler in up_block.upsamplers or ():
            out = _lean_upsample(upsampler, sample, band_mb)
            sample = upsampler(sample) if out is None else out
    if type(decoder.conv_norm_out) is nn.GroupNorm:
        sample = _group_norm_(decoder.conv_norm_out, sample, band_mb)  # this code owns ``sample``
    else:
        sample = decoder.conv_norm_out(sample)
    sample = _silu_(sample) if isinstance(decoder.conv_act, nn.SiLU) else decoder.conv_act(sample)
    return banded_conv(decoder.conv_out, sample, band_mb)


def lean_decode_supported(vae: nn.Module) -> str | None:
    """``None`` when :func:`lean_vae_decode` can run this VAE, else the reason it cannot."""
    dec = getattr(vae, "decoder", None)
    needed = ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")
    if dec is None or not all(hasattr(dec, n) for n in needed):
        return "not a diffusers AutoencoderKL decoder"
    if not isinstance(dec, nn.Module) or type(dec).__name__ != "Decoder":
        return f"decoder type {type(dec).__name__} (compiled or replaced)"
    if hasattr(vae, "_hf_hook"):
        return "an accelerate hook (offloading) is attached to the VAE"
    if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False):
        return "the VAE's own tiling/slicing is enabled"
    if torch.is_grad_enabled():
        return "gradients are enabled (in-place ops would break autograd)"
    return None


def lean_vae_decode(vae: nn.Module, z: torch.Tensor, band_mb: float = DEFAULT_BAND_MB) -> torch.Tensor:
    """``vae.decode(z).sample`` with lower peak memory (same operations; see the module notes on exactness).

    Args:
        vae: diffusers ``AutoencoderKL`` (eval mode).
        z: ``(B, C_latent, h, w)`` latents already divided by the scaling factor.
        band_mb: working-set budget of one convolution band, MiB.

    Returns:
        ``(B, 3, 8h, 8w)`` in the VAE's output range ([-1, 1] nominal), same dtype as ``z``.
    """
    reason = lean_decode_supported(vae)
    if reason is not None:
        logger.debug("lean VAE decode not used: %s", reason)
        return vae.decode(z).sample
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    return lean_decoder_forward(vae.decoder, z, band_mb)
