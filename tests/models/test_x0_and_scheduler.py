"""Scheduler constants and the x0 recovery (spec §2.6)."""

import torch

from osdface.constants import ALPHA_CUMPROD_399
from osdface.testing import sd21_scheduler, tiny_pipeline


def test_alpha_cumprod_399_from_sd21_scheduler_config():
    ac = sd21_scheduler().alphas_cumprod
    assert ac.dtype == torch.float32
    assert abs(float(ac[399]) - 0.42608613) < 5e-9
    assert float(ac[399]) == ALPHA_CUMPROD_399
    assert abs(float(ac[999]) - 0.0046600950881839) < 1e-12


def test_predict_x0_constants_and_float64():
    pipe = tiny_pipeline(0, with_lora=False)
    z = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    x0 = pipe.predict_x0(z, eps)
    assert x0.dtype == torch.float32
    expected = 1.5319736749 * z.double() - 1.1605788816 * eps.double()
    assert torch.allclose(x0.double(), expected, atol=1e-6)
    # computed in float64, not float32: matches the float64 formula to float32 rounding only
    a = torch.tensor(ALPHA_CUMPROD_399, dtype=torch.float64)
    exact = ((z.double() - (1 - a) ** 0.5 * eps.double()) / a**0.5).float()
    assert torch.equal(x0, exact)
