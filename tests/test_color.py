import pytest
import torch

from osdface.color import (
    COLOR_FIXES,
    adain_color_fix,
    apply_color_fix,
    binomial_blur,
    wavelet_color_fix,
    wavelet_decomposition,
)


def _smooth_and_detail(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    low = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(size, size), mode="bicubic",
                                          align_corners=False).clamp(0.2, 0.8)
    detail = (torch.rand(1, 3, size, size, generator=g) - 0.5) * 0.1
    return low, detail


def test_decomposition_is_exact_and_low_band_is_smooth():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    high, low = wavelet_decomposition(x)
    torch.testing.assert_close(high + low, x, atol=1e-6, rtol=0)
    # the low band has much less pixel-to-pixel variation than white noise
    assert low.diff(dim=-1).abs().mean() < 0.05 * x.diff(dim=-1).abs().mean()


def test_binomial_blur_keeps_constants_and_shape_with_replicate_padding():
    x = torch.full((1, 3, 20, 20), 0.37)
    for d in (1, 2, 4, 8, 16):
        y = binomial_blur(x, d)
        assert y.shape == x.shape
        torch.testing.assert_close(y, x)
    # a dilated kernel moves mass exactly d pixels away
    imp = torch.zeros(1, 1, 33, 33)
    imp[..., 16, 16] = 1
    y = binomial_blur(imp, 4)
    assert y[0, 0, 16, 20].item() == pytest.approx(2 / 16) and y[0, 0, 16, 18].item() == 0


def test_wavelet_takes_colour_from_source_and_detail_from_target():
    low, detail = _smooth_and_detail()
    source = low  # the LQ: right colours, no detail
    target = (low + detail + torch.tensor([0.15, -0.1, 0.05]).view(1, 3, 1, 1)).clamp(0, 1)  # colour-shifted
    out = wavelet_color_fix(target, source)
    # global colour matches the source again
    assert (out.mean((2, 3)) - source.mean((2, 3))).abs().max() < 0.01
    assert (target.mean((2, 3)) - source.mean((2, 3))).abs().max() > 0.04
    # the high band of the output is the target's
    torch.testing.assert_close(wavelet_decomposition(out)[0], wavelet_decomposition(target)[0], atol=0.02, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_adain_matches_channel_statistics():
    g = torch.Generator().manual_seed(3)
    target = torch.rand(2, 3, 32, 32, generator=g) * 0.5
    source = torch.rand(2, 3, 32, 32, generator=g) * 0.3 + 0.4
    out = adain_color_fix(target, source)
    torch.testing.assert_close(out.mean((2, 3)), source.mean((2, 3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.flatten(2).std(-1), source.flatten(2).std(-1), atol=1e-3, rtol=0)


def test_registry_and_errors():
    x = torch.rand(1, 3, 16, 16)
    assert set(COLOR_FIXES) == {"wavelet", "adain", "none"}
    assert torch.equal(apply_color_fix("none", x, x * 0), x)
    with pytest.raises(ValueError, match=r"unknown colour fix 'sharpen'; choose from \['adain', 'none', 'wavelet'\]"):
        apply_color_fix("sharpen", x, x)
    with pytest.raises(ValueError, match="equal shapes"):
        wavelet_color_fix(x, torch.rand(1, 3, 8, 8))
