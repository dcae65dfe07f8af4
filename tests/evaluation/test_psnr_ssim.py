import math

import numpy as np
import pytest
import torch

from osdface.evaluation import create_metric


def _const(v, h=32, w=32):
    return torch.full((1, 3, h, w), v / 255.0)


def test_psnr_constant_offset_and_identical():
    m = create_metric("psnr")
    assert not m.lower_better and m.full_reference
    assert m(_const(100), _const(110)).item() == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    assert math.isinf(m(_const(100), _const(100)).item())


def test_psnr_y_on_gray_scales_by_219_over_255():
    # gray images: Y = 16 + 219/255 * v, so the Y error is 219/255 of the RGB error
    d = 255 * 219 / 255 * 10 / 255
    assert create_metric("psnr_y")(_const(100), _const(110)).item() == pytest.approx(
        20 * math.log10(255 / d), abs=1e-6)


def test_ssim_identical_and_constant_images():
    m = create_metric("ssim")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 40, generator=g)
    np.testing.assert_allclose(m(x, x).numpy(), 1.0, atol=1e-12)
    # flat images: sigma terms vanish, SSIM = (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1)
    c1 = (0.01 * 255) ** 2
    want = (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1)
    assert m(_const(100), _const(150)).item() == pytest.approx(want, abs=1e-6)
    # symmetric, and lower for noisier copies
    n1 = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    n2 = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (m(n1, x) > m(n2, x)).all()
    np.testing.assert_allclose(m(n1, x).numpy(), m(x, n1).numpy(), atol=1e-12)


def test_shape_mismatch_and_range_errors():
    m = create_metric("psnr")
    with pytest.raises(ValueError, match="differ in shape"):
        m(_const(1, 32, 32), _const(1, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m(torch.full((1, 3, 8, 8), 2.0), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="full-reference"):
        m(_const(1))
