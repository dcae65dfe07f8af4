"""The memory-lean VAE decode is the same computation as ``vae.decode``.

Banding changes no index or sum (the banded convolutions below are bit-identical), but oneDNN may
pick a different convolution kernel for a band than for the whole image (it does for the 8-channel
tiny VAE at 64 px), so whole-decoder comparisons allow float-order differences (1e-5; a wrong halo
or band edge gives errors of order 1). On the real SD VAE at 512 px the outputs are identical
(``benchmarks/bench_restore.py --compare-lean`` reports the max difference).
"""

import pytest
import torch
import torch.nn.functional as F

from osdface.models.lean_decode import (
    _group_norm_,
    _lean_resnet,
    _lean_upsample,
    banded_conv,
    lean_decode_supported,
    lean_vae_decode,
)
from osdface.testing import synthetic_faces, tiny_pipeline, tiny_vae

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
    # guards against silently falling back (e.g. a diffusers attribute the structure check rejects)
    vae = tiny_vae(0).eval()
    with torch.inference_mode():
        for block in vae.decoder.up_blocks:
            for r in block.resnets:
                c = r.conv1.in_channels
                assert _lean_resnet(r, [torch.randn(1, c, 8, 8)], TINY_BAND) is not None
            for u in block.upsamplers or ():
                assert _lean_upsample(u, torch.randn(1, u.channels, 8, 8), TINY_BAND) is not None
        assert lean_decode_supported(vae) is None


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


def test_lean_decode_falls_back_where_it_must():
    vae = tiny_vae(2).eval()
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    assert "gradients" in lean_decode_supported(vae)
    out = lean_vae_decode(vae, z, band_mb=TINY_BAND)  # training path: plain decode, autograd intact
    out.mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    vae.enable_slicing()
    with torch.inference_mode():
        assert "slicing" in lean_decode_supported(vae)


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
    plain = pipe(faces, output_type="np").images
    pipe.set_heap_trimming(True)
    assert (pipe(faces, output_type="np").images == plain).all()
