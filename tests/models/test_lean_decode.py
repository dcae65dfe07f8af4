"""The memory-lean VAE decode is the same computation as ``vae.decode``.

Banding changes no index or sum (the banded convolutions below are bit-identical), but oneDNN may
pick a different convolution kernel for a band than for the whole image (it does for the 8-channel
tiny VAE at 64 px), so whole-decoder comparisons allow float-order differences (1e-5; a wrong halo
or band edge gives errors of order 1). On the real SD VAE at 512 px the outputs are identical
(``benchmarks/bench_restore.py --compare-lean`` reports the max difference).

Where the lean path cannot run it decodes with ``vae.decode`` itself, never a mix: documented fallbacks
(autograd, the VAE's own tiling/slicing) quietly, any unrecognised decoder structure with one warning.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from osdface.models.lean_decode import (
    _group_norm_,
    _resnet_problem,
    _upsample_problem,
    banded_conv,
    decoder_structure_problem,
    lean_decode_supported,
    lean_decoder_forward,
    lean_vae_decode,
)
from osdface.testing import TINY_RESOLUTION, synthetic_faces, tiny_pipeline, tiny_vae

TINY_BAND = 1e-3  # MiB: forces the minimum band height (8 rows), so every high-res layer is banded


@pytest.mark.parametrize("k,groups,h,upsample", [(3, 1, 37, False), (1, 1, 20, False), (3, 2, 29, True),
                                                 (3, 1, 8, True), (5, 1, 33, False)])
def test_banded_conv_is_bit_identical(k, groups, h, upsample):
    torch.manual_seed(k + h)
    conv = torch.nn.Conv2d(6, 4, k, padding=k // 2, groups=groups)
    x = torch.randn(2, 6, h, 23)
    with torch.no_grad():
        ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if upsample else x)
        out = banded_conv(conv, x, band_mb=TINY_BAND, upsample=upsample)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


def test_banded_conv_keeps_channels_last():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 40, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = banded_conv(conv, x, band_mb=TINY_BAND)
        assert torch.equal(out, conv(x))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_banded_conv_leaves_other_convs_to_torch():
    conv = torch.nn.Conv2d(3, 3, 3, stride=2, padding=1)  # not a "same" stride-1 conv: plain call
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(banded_conv(conv, x, band_mb=TINY_BAND), conv(x))


def test_in_place_group_norm_is_bit_identical():
    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
        x = torch.randn(2, 16, 24, 24) * 3 + 1
        ref = gn(x)
        y = x.clone()
        out = _group_norm_(gn, y, band_mb=TINY_BAND)  # one group at a time
    assert out.data_ptr() == y.data_ptr()
    assert torch.equal(out, ref)


def test_every_tiny_decoder_block_takes_the_lean_path():
    # guards against falling back (e.g. a diffusers attribute the structure check rejects)
    vae = tiny_vae(0).eval()
    for block in vae.decoder.up_blocks:
        for r in block.resnets:
            assert _resnet_problem(r) is None
        for u in block.upsamplers or ():
            assert _upsample_problem(u) is None
    assert decoder_structure_problem(vae) is None
    with torch.inference_mode():
        assert lean_decode_supported(vae) is None


def test_sd21_vae_structure_is_supported():
    """The released SD 2.1-base VAE architecture (built on the meta device: no memory) passes the check."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    assert decoder_structure_problem(vae.eval()) is None


def _attention_vae():
    """A VAE whose up blocks also hold attention (``AttnUpDecoderBlock2D``): a structure the lean path does
    not reproduce (walking ``resnets`` + ``upsamplers`` alone would skip the attention)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=TINY_RESOLUTION, layers_per_block=1,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("AttnUpDecoderBlock2D",) * 4,
    ).eval()


def _lean_warnings(caplog):
    return [r for r in caplog.records if r.name == "osdface.models.lean_decode" and r.levelno >= logging.WARNING]


def test_unsupported_structure_warns_once_and_equals_vae_decode(caplog):
    vae = _attention_vae()
    assert "AttnUpDecoderBlock2D" in decoder_structure_problem(vae)
    z = torch.randn(2, 4, 8, 8) * 3
    with caplog.at_level(logging.DEBUG, logger="osdface"), torch.inference_mode():
        ref = vae.decode(z).sample
        outs = [lean_vae_decode(vae, z, band_mb=TINY_BAND) for _ in range(3)]
        with pytest.raises(ValueError, match="AttnUpDecoderBlock2D"):  # the lean forward itself never falls back
            lean_decoder_forward(vae.decoder, z)
    assert all(torch.equal(o, ref) for o in outs)
    warned = _lean_warnings(caplog)
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert "decoder.up_blocks.0 is AttnUpDecoderBlock2D" in warned[0].getMessage()
    assert "vae.decode" in warned[0].getMessage()


@pytest.mark.parametrize("change,reason", [
    (lambda d: setattr(d.up_blocks[1].resnets[0], "output_scale_factor", 2.0), "up_blocks.1.resnets.0: output_scale_factor"),
    (lambda d: setattr(d.up_blocks[0].upsamplers[0], "interpolate", False), "up_blocks.0.upsamplers.0"),
    (lambda d: setattr(d, "conv_norm_out", torch.nn.LayerNorm(8)), "conv_norm_out is LayerNorm"),
    (lambda d: setattr(d.up_blocks[2].resnets[0], "dropout", torch.nn.Identity()), "dropout is Identity"),
])
def test_structure_check_names_the_module(change, reason):
    vae = tiny_vae(4).eval()
    change(vae.decoder)
    assert reason in decoder_structure_problem(vae)


def test_supported_structure_does_not_warn(caplog):
    vae = tiny_vae(5).eval()
    z = torch.randn(1, 4, 8, 8)
    with caplog.at_level(logging.DEBUG, logger="osdface"), torch.inference_mode():
        lean_vae_decode(vae, z, band_mb=TINY_BAND)
    assert not _lean_warnings(caplog)


@pytest.mark.parametrize("batch", [1, 2])
def test_lean_vae_decode_equals_vae_decode(batch):
    vae = tiny_vae(1).eval()
    torch.manual_seed(batch)
    z = torch.randn(batch, 4, 8, 8) * 3
    with torch.inference_mode():
        ref = vae.decode(z).sample
        for band in (TINY_BAND, 32.0):
            out = lean_vae_decode(vae, z, band_mb=band)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=f"band_mb={band}")


def test_lean_decode_falls_back_where_it_must(caplog):
    """Documented fallbacks: plain ``vae.decode`` (same output), logged at debug level only."""
    vae = tiny_vae(2).eval()
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert "gradients" in lean_decode_supported(vae)
    with caplog.at_level(logging.DEBUG, logger="osdface"):
        out = lean_vae_decode(vae, z, band_mb=TINY_BAND)  # training path: plain decode, autograd intact
        out.mean().backward()
        assert z.grad is not None and torch.isfinite(z.grad).all()
        with torch.inference_mode():
            for enable, word in ((vae.enable_slicing, "slicing"), (vae.enable_tiling, "tiling")):
                vae.disable_slicing()
                vae.disable_tiling()
                enable()
                assert word in lean_decode_supported(vae)
                assert torch.equal(lean_vae_decode(vae, z, band_mb=TINY_BAND), vae.decode(z).sample)
            vae.disable_tiling()
            vae.train()
            assert "training mode" in lean_decode_supported(vae)
    assert not _lean_warnings(caplog)
    assert any("lean VAE decode not used: gradients" in r.getMessage() for r in caplog.records)


def test_pipeline_outputs_identical_with_and_without_lean_decode():
    pipe = tiny_pipeline(0)
    faces = synthetic_faces(3, seed=4)
    pipe.set_lean_decode(False)
    plain = pipe(faces, output_type="pt").images
    pipe.set_lean_decode(True, band_mb=TINY_BAND)
    lean = pipe(faces, output_type="pt").images
    torch.testing.assert_close(lean, plain, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="band_mb"):
        pipe.set_lean_decode(True, band_mb=0)


def test_heap_trimming_between_stages_keeps_outputs():
    import platform

    from osdface.utils.memory import trim_heap

    assert trim_heap() is (platform.libc_ver()[0] == "glibc")  # found wherever glibc is the libc
    pipe = tiny_pipeline(1)
    faces = synthetic_faces(2, seed=5)
    pipe.set_heap_trimming(False)
    plain = pipe(faces, output_type="uint8").images
    pipe.set_heap_trimming(True)
    assert (pipe(faces, output_type="uint8").images == plain).all()
