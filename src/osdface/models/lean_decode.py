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
1.2 GB to about 0.7 GB (``benchmarks/bench_restore.py`` reports the process peak).

When it is used. :func:`lean_vae_decode` runs the lean path only on a decoder whose structure
:func:`decoder_structure_problem` recognises, block by block, as the one whose ``forward`` this
module mirrors (diffusers ``AutoencoderKL`` → ``Decoder`` → ``UpDecoderBlock2D`` of VAE-flavour
``ResnetBlock2D`` + nearest-×2 ``Upsample2D``; checked against diffusers 0.30–0.4x). Otherwise it
decodes with ``vae.decode`` and never mixes the two:

* documented fallbacks, logged at debug level (:func:`runtime_fallback_reason`): gradients enabled
  (in-place operations would break autograd; training decodes this way), the VAE's own tiling or
  slicing enabled, an accelerate offloading hook, a ``torch.compile``-d decoder, a VAE in training
  mode (active dropout);
* any other structure (another diffusers version's internals, other block types, a VAE subclass):
  one logged **warning** per VAE naming the reason, then ``vae.decode`` — results are never changed
  silently, only the memory saving is lost.
"""

from __future__ import annotations

import weakref

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


def _is_diffusers(module: object, class_name: str) -> bool:
    """``module`` is an instance of exactly diffusers' ``class_name`` (by name and package: the
    class moved between diffusers modules across versions; a subclass may override ``forward``)."""
    t = type(module)
    return t.__name__ == class_name and t.__module__.split(".")[0] == "diffusers"


_MISSING = object()


def _resnet_problem(block: nn.Module) -> str | None:
    """``None`` when ``block`` is a VAE-flavour diffusers ``ResnetBlock2D`` that :func:`_lean_resnet`
    reproduces with ``temb=None`` (no resampling, no time embedding, unit output scale, SiLU, GroupNorm,
    plain dropout), else what differs."""
    if not _is_diffusers(block, "ResnetBlock2D"):
        return f"block type {type(block).__name__}, not diffusers' ResnetBlock2D"
    for name in ("upsample", "downsample", "time_emb_proj"):
        value = getattr(block, name, _MISSING)
        if value is not None:
            return f"{name} is {'missing' if value is _MISSING else type(value).__name__}, expected None"
    if getattr(block, "time_embedding_norm", None) not in ("default", "group"):  # same ops when temb is None
        return f"time_embedding_norm {getattr(block, 'time_embedding_norm', None)!r}"
    if float(getattr(block, "output_scale_factor", 0.0)) != 1.0:
        return f"output_scale_factor {getattr(block, 'output_scale_factor', None)!r}, expected 1.0"
    if not isinstance(getattr(block, "nonlinearity", None), nn.SiLU):
        return f"nonlinearity {type(getattr(block, 'nonlinearity', None)).__name__}, expected SiLU"
    for name in ("norm1", "norm2"):
        if type(getattr(block, name, None)) is not nn.GroupNorm:
            return f"{name} is {type(getattr(block, name, None)).__name__}, expected GroupNorm"
    if type(getattr(block, "dropout", None)) is not nn.Dropout:
        return f"dropout is {type(getattr(block, 'dropout', None)).__name__}, expected Dropout"
    for name in ("conv1", "conv2"):
        if not isinstance(getattr(block, name, None), nn.Module):
            return f"no {name}"
    if not hasattr(block, "conv_shortcut"):
        return "no conv_shortcut attribute"
    return None


def _upsample_problem(up: nn.Module) -> str | None:
    """``None`` when ``up`` is a diffusers ``Upsample2D`` doing nearest ×2 then ``conv`` (no norm, no
    transposed conv), else what differs."""
    if not _is_diffusers(up, "Upsample2D"):
        return f"upsampler type {type(up).__name__}, not diffusers' Upsample2D"
    if getattr(up, "norm", _MISSING) is not None:
        return "upsampler has a norm"
    if getattr(up, "use_conv_transpose", True) or not getattr(up, "interpolate", False) \
            or not getattr(up, "use_conv", False) or getattr(up, "name", "") != "conv":
        return "upsampler is not nearest x2 + conv"
    if not isinstance(getattr(up, "conv", None), nn.Module):
        return "upsampler has no conv"
    return None


def decoder_structure_problem(vae: nn.Module) -> str | None:
    """The explicit structural check: ``None`` when every module :func:`lean_decoder_forward` replaces
    is one whose diffusers ``forward`` it reproduces, else the first difference, naming the module.

    Checked: ``vae`` is diffusers' ``AutoencoderKL`` (its ``decode`` = optional ``post_quant_conv``
    then ``decoder``); the decoder is diffusers' ``Decoder`` with ``conv_in``, ``mid_block`` (run as is),
    ``up_blocks``, a GroupNorm ``conv_norm_out``, ``conv_act`` and ``conv_out``; every up block is an
    ``UpDecoderBlock2D`` (resnets, then upsamplers; no attention), every resnet passes
    :func:`_resnet_problem` and every upsampler :func:`_upsample_problem`.
    """
    if not _is_diffusers(vae, "AutoencoderKL"):
        return f"VAE type {type(vae).__name__}, not diffusers' AutoencoderKL"
    return _decoder_problem(getattr(vae, "decoder", None))


def _decoder_problem(dec: nn.Module | None) -> str | None:
    """The decoder part of :func:`decoder_structure_problem`."""
    if not _is_diffusers(dec, "Decoder"):
        return f"decoder type {type(dec).__name__}, not diffusers' Decoder"
    for name in ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out"):
        if not isinstance(getattr(dec, name, None), nn.Module):
            return f"decoder.{name} is missing"
    if type(dec.conv_norm_out) is not nn.GroupNorm:
        return f"decoder.conv_norm_out is {type(dec.conv_norm_out).__name__}, expected GroupNorm"
    if not any(True for _ in dec.up_blocks.parameters()):
        return "decoder.up_blocks hold no parameters"
    for i, block in enumerate(dec.up_blocks):
        where = f"decoder.up_blocks.{i}"
        if not _is_diffusers(block, "UpDecoderBlock2D"):
            return f"{where} is {type(block).__name__}, not diffusers' UpDecoderBlock2D"
        for j, resnet in enumerate(block.resnets):
            problem = _resnet_problem(resnet)
            if problem is not None:
                return f"{where}.resnets.{j}: {problem}"
        for j, up in enumerate(block.upsamplers or ()):
            problem = _upsample_problem(up)
            if problem is not None:
                return f"{where}.upsamplers.{j}: {problem}"
    return None


def runtime_fallback_reason(vae: nn.Module) -> str | None:
    """The documented, expected reasons to decode with ``vae.decode`` (logged at debug level), or ``None``."""
    if torch.is_grad_enabled():
        return "gradients are enabled (in-place ops would break autograd)"
    if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False):
        return "the VAE's own tiling/slicing is enabled"
    if hasattr(vae, "_hf_hook"):
        return "an accelerate hook (offloading) is attached to the VAE"
    dec = getattr(vae, "decoder", None)
    if dec is not None and hasattr(dec, "_orig_mod"):
        return "the decoder is compiled (torch.compile)"
    if isinstance(vae, nn.Module) and any(m.training for m in vae.modules()):
        return "the VAE is in training mode (dropout active)"
    return None


def lean_decode_supported(vae: nn.Module) -> str | None:
    """``None`` when :func:`lean_vae_decode` takes the lean path for this VAE now, else the reason it
    does not (a documented :func:`runtime_fallback_reason` first, then :func:`decoder_structure_problem`)."""
    return runtime_fallback_reason(vae) or decoder_structure_problem(vae)


def _lean_resnet(block: nn.Module, holder: list[torch.Tensor], band_mb: float) -> torch.Tensor:
    """diffusers ``ResnetBlock2D.forward(x, None)`` for a block that passes :func:`_resnet_problem`.

    ``holder`` is a one-element list with ``x``; when the block has a 1×1 shortcut, ``x`` is consumed
    (the shortcut is taken first, then ``x``'s storage is normalised in place), so the caller must not
    keep another reference to it if it wants the memory back.
    """
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
    return h.add_(shortcut)  # (x + h) / 1.0 in diffusers; IEEE addition commutes


def _lean_upsample(up: nn.Module, x: torch.Tensor, band_mb: float) -> torch.Tensor:
    """diffusers ``Upsample2D.forward(x)`` for an upsampler that passes :func:`_upsample_problem`."""
    return banded_conv(up.conv, x, band_mb, upsample=True)


def _lean_forward(decoder: nn.Module, z: torch.Tensor, band_mb: float) -> torch.Tensor:
    """``decoder(z)`` for a decoder already checked by :func:`decoder_structure_problem`."""
    sample = decoder.conv_in(z)
    sample = decoder.mid_block(sample, None)
    sample = sample.to(next(iter(decoder.up_blocks.parameters())).dtype)  # older diffusers upcast here
    for up_block in decoder.up_blocks:
        for resnet in up_block.resnets:
            holder = [sample]
            del sample  # let _lean_resnet free or reuse the block input
            sample = _lean_resnet(resnet, holder, band_mb)
        for upsampler in up_block.upsamplers or ():
            sample = _lean_upsample(upsampler, sample, band_mb)
    sample = _group_norm_(decoder.conv_norm_out, sample, band_mb)  # this code owns ``sample``
    sample = _silu_(sample) if isinstance(decoder.conv_act, nn.SiLU) else decoder.conv_act(sample)
    return banded_conv(decoder.conv_out, sample, band_mb)


def lean_decoder_forward(decoder: nn.Module, z: torch.Tensor, band_mb: float = DEFAULT_BAND_MB) -> torch.Tensor:
    """``decoder(z)`` for a diffusers VAE ``Decoder``, with the memory-lean block implementations
    (no fallback of any kind: an unsupported structure is an error here).

    Args:
        decoder: a diffusers ``Decoder`` that passes the structural check of :func:`decoder_structure_problem`.
        z: ``(B, C_latent, h, w)`` after ``post_quant_conv``.
        band_mb: working-set budget of one convolution band, MiB.

    Raises:
        ValueError: the decoder's structure is not one this module reproduces (the reason).
    """
    problem = _decoder_problem(decoder)
    if problem is not None:
        raise ValueError(f"lean VAE decode does not support this decoder: {problem}")
    return _lean_forward(decoder, z, band_mb)


#: VAEs whose unsupported structure has been reported (each is warned about once)
_warned: weakref.WeakSet = weakref.WeakSet()


def lean_vae_decode(vae: nn.Module, z: torch.Tensor, band_mb: float = DEFAULT_BAND_MB) -> torch.Tensor:
    """``vae.decode(z).sample`` with lower peak memory (same operations; see the module notes on exactness).

    Falls back to ``vae.decode(z).sample`` itself — never to a partial lean path — for the documented
    :func:`runtime_fallback_reason` s (debug log) and for a structure :func:`decoder_structure_problem`
    does not recognise (one warning per VAE naming the reason).

    Args:
        vae: diffusers ``AutoencoderKL`` (eval mode).
        z: ``(B, C_latent, h, w)`` latents already divided by the scaling factor.
        band_mb: working-set budget of one convolution band, MiB.

    Returns:
        ``(B, 3, 8h, 8w)`` in the VAE's output range ([-1, 1] nominal), same dtype as ``z``.
    """
    reason = runtime_fallback_reason(vae)
    if reason is not None:
        logger.debug("lean VAE decode not used: %s", reason)
        return vae.decode(z).sample
    problem = decoder_structure_problem(vae)
    if problem is not None:
        if vae not in _warned:
            _warned.add(vae)
            logger.warning("memory-lean VAE decode does not support this VAE (%s); decoding with vae.decode "
                           "instead: same results, higher peak memory", problem)
        return vae.decode(z).sample
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    return _lean_forward(vae.decoder, z, band_mb)
