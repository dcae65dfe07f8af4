import pytest
import torch

from osdface.losses import DISTSLoss, EdgeAwareDISTSLoss, LPIPSLoss, sobel_edges
from osdface.weights import WeightsNotFoundError


def test_sobel_edges_matches_spec_kernels():
    # a vertical step edge: gray 0 | 1; gx response at the boundary = 1*(1+2+1) = 4 (zero padding at borders)
    x = torch.zeros(1, 3, 6, 6)
    x[..., 3:] = 1.0
    e = sobel_edges(x)
    assert e.shape == (1, 1, 6, 6)
    assert torch.allclose(e[0, 0, 2, 2], torch.tensor(4.0), atol=1e-4)
    assert torch.allclose(e[0, 0, 2, 0], torch.tensor(1e-3), atol=1e-5)  # flat area: sqrt(1e-6)
    # channel-mean grayscale (not ITU-R 601): a pure red step gives one third of the response
    r = torch.zeros(1, 3, 6, 6)
    r[:, 0, :, 3:] = 1.0
    assert torch.allclose(sobel_edges(r)[0, 0, 2, 2], torch.tensor(4.0 / 3), atol=1e-4)


@pytest.mark.parametrize("make", [lambda: LPIPSLoss("alex", pretrained=False), lambda: LPIPSLoss("vgg", pretrained=False),
                                  lambda: DISTSLoss(pretrained=False), lambda: EdgeAwareDISTSLoss(pretrained=False)])
def test_random_init_losses_grad_and_eval_mode(make):
    loss = make()
    loss.train()
    assert not loss.net.training  # the metric network never switches to training mode
    assert not any(p.requires_grad for p in loss.parameters())
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 32, 32, generator=g)
    pred = (target + 0.2 * torch.rand(2, 3, 32, 32, generator=g)).clamp(0, 1).requires_grad_(True)
    val = loss(pred, target)
    assert val.ndim == 0 and torch.isfinite(val) and abs(val.item()) > 1e-6
    val.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert abs(loss(target, target).item()) < 1e-5  # identical images: zero distance


def test_loss_shape_errors():
    loss = DISTSLoss(pretrained=False)
    with pytest.raises(ValueError, match="differ|equal-shaped"):
        loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 8, 8))


def test_missing_weights_error_names_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"dists_vgg16\.safetensors.*osdface weights install"):
        DISTSLoss(weights_dir=tmp_path)


def test_real_weight_losses(metric_weights_dir, reference_dir, load_rgb):
    ref = load_rgb(reference_dir / "calibration/ref_dir/I04.bmp")
    dist = load_rgb(reference_dir / "calibration/dist_dir/I04.bmp")
    # calibration value of DISTS on I04 (IQA-PyTorch ResultsCalibra): 0.1424
    d = DISTSLoss(weights_dir=metric_weights_dir)
    assert d(dist, ref).item() == pytest.approx(0.1424, abs=1e-4)
    lp = LPIPSLoss("alex", weights_dir=metric_weights_dir)
    assert lp(dist, ref).item() == pytest.approx(0.2572, abs=1e-4)
    ea = EdgeAwareDISTSLoss(weights_dir=metric_weights_dir)
    pred = dist.clone().requires_grad_(True)
    v = ea(pred, ref)
    # EA-DISTS = DISTS(image) + DISTS(edges), and the edge term is a real positive distance
    assert v.item() > 0.1424 + 1e-3
    assert v.item() == pytest.approx(0.1424 + ea.distance(sobel_edges(dist), sobel_edges(ref)).item(), abs=1e-5)
    v.backward()
    assert pred.grad.abs().sum() > 0
    assert ea(ref, ref).item() == pytest.approx(0.0, abs=1e-5)
