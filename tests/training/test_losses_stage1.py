"""Stage-1 losses: pixel, GAN + adaptive weight, VQ (taming form), association (DAEFR), bundle."""

import math

import pytest
import torch
import torch.nn.functional as F

from osdface.losses.adversarial import GANLoss, adaptive_gan_weight
from osdface.losses.association import AssociationLoss
from osdface.losses.bundle import LossBundle, build_loss
from osdface.losses.pixel import CharbonnierLoss, L1Loss, MSELoss
from osdface.losses.vq import VQLoss, codebook_usage


def test_pixel_losses():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert L1Loss()(a, b).item() == pytest.approx(0.5)
    assert MSELoss()(a, b).item() == pytest.approx(0.25)
    assert CharbonnierLoss(1e-3)(a, b).item() == pytest.approx(math.sqrt(0.25 + 1e-6))
    assert L1Loss()(b, b).item() == 0.0


def test_hinge_and_other_gan_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    g = GANLoss("hinge")
    # D: 0.5·(mean(relu(1-real)) + mean(relu(1+fake))) = 0.5·(0.25 + 0.5)
    assert g.discriminator(real, fake).item() == pytest.approx(0.375)
    assert g.generator(fake).item() == pytest.approx(1.0)
    ns = GANLoss("non_saturating")
    assert ns.generator(fake).item() == pytest.approx(F.softplus(-fake).mean().item())
    ls = GANLoss("lsgan")
    assert ls.discriminator(torch.ones(3), torch.zeros(3)).item() == 0.0
    with pytest.raises(ValueError, match="choose from"):
        GANLoss("wgan")


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (3 * w).sum()           # grad (3, 3), norm 3√2
    g = (w**2).sum()              # grad (2, 4), norm √20
    lam = adaptive_gan_weight(rec, g, w)
    assert lam.item() == pytest.approx(3 * math.sqrt(2) / (math.sqrt(20) + 1e-4), rel=1e-6)
    assert not lam.requires_grad
    # graphs are retained for the real backward
    (rec + lam * g).backward()
    assert w.grad is not None
    # clamped
    assert adaptive_gan_weight((1e9 * w).sum(), (1e-9 * w).sum(), w).item() == 1e4


def test_vq_loss_taming_form_and_gradients():
    z = torch.randn(1, 4, 2, 2, requires_grad=True)
    codes = torch.randn(1, 4, 2, 2, requires_grad=True)
    loss = VQLoss(beta=0.25)(codes, z)
    d2 = ((codes - z) ** 2).mean()
    assert loss.item() == pytest.approx(1.25 * d2.item(), rel=1e-6)
    loss.backward()
    n = z.numel()
    # commitment (weight 1) moves z; the codebook term (weight β) moves the codes
    assert torch.allclose(z.grad, 2 * (z - codes).detach() / n, atol=1e-6)
    assert torch.allclose(codes.grad, 0.25 * 2 * (codes - z).detach() / n, atol=1e-6)


def test_codebook_usage():
    u = codebook_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert u["perplexity"] == pytest.approx(4.0) and u["usage"] == 0.5
    u = codebook_usage(torch.zeros(10, dtype=torch.long), 8)
    assert u["perplexity"] == pytest.approx(1.0) and u["usage"] == 1 / 8


def test_association_loss_is_daefr_batchwide_clip_ce():
    torch.manual_seed(0)
    loss = AssociationLoss()
    assert loss.logit_scale.requires_grad and loss.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    hq, lq = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    # reference: flatten all positions of all images → N = 18 rows
    h = F.normalize(hq.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    l_ = F.normalize(lq.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    logits = (1 / 0.07) * h @ l_.t()
    t = torch.arange(18)
    ref = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.t(), t))
    got = loss(hq, lq)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert loss.similarity(hq, lq).shape == (18, 18)
    # symmetric in its arguments, and matched features score far lower than random ones
    assert loss(lq, hq).item() == pytest.approx(got.item(), rel=1e-5)
    assert loss(hq, hq * 3).item() < 0.1 * got.item()
    got.backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad != 0
    fixed = AssociationLoss(learnable=False)
    assert not any(True for _ in fixed.parameters())
    with pytest.raises(ValueError, match="same shape"):
        loss(hq, lq[:1])


def test_bundle_weights_and_terms():
    a, b = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    bundle = LossBundle({"l1": L1Loss(), "l2": MSELoss(), "charbonnier": CharbonnierLoss()},
                        {"l1": 2.0, "l2": 0.5, "charbonnier": 0.0})
    out = bundle(a, b)
    assert set(out.terms) == {"l1", "l2"}            # weight 0: not computed
    assert out.total.item() == pytest.approx(2.0 * 1 + 0.5 * 1)
    logs = out.detached("x/")
    assert logs == {"x/l1": 1.0, "x/l2": 1.0, "x/total": 2.5}
    comb = LossBundle.combine({"a": torch.tensor(2.0), "b": torch.tensor(3.0)}, {"a": 1.0, "b": -1.0})
    assert comb.total.item() == -1.0
    with pytest.raises(ValueError, match="no weight"):
        LossBundle({"l1": L1Loss()}, {})
    with pytest.raises(ValueError, match="choose from"):
        build_loss("ssim")


def test_registered_lpips_takes_model_space_images():
    from osdface.losses.perceptual import LPIPSLoss

    torch.manual_seed(0)
    wrapped = build_loss("lpips", net="alex", pretrained=False)
    torch.manual_seed(0)
    plain = LPIPSLoss(net="alex", pretrained=False)
    with torch.no_grad():  # the registry makes random heads non-negative (a distance, as trained LPIPS)
        for m in plain.net.lins.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.abs_()
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    got = wrapped(a * 2 - 1, b * 2 - 1)
    assert got.item() == pytest.approx(plain(a, b).item(), rel=1e-6)
    assert got.item() > 0 and wrapped(a * 2 - 1, a * 2 - 1).item() == pytest.approx(0.0, abs=1e-6)
    for seed in range(3):  # random pairs: never negative
        x, y = torch.rand(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        assert wrapped(x, y).item() > 0
