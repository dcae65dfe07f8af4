"""Identity metric on real photos: the offline FaceNet port separates same from different people."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osdface.evaluation import create_metric
from osdface.models.identity import ArcFaceResNet, InceptionResnetV1, arcface_preprocess
from osdface.weights import WeightsNotFoundError


def _crop(img, box, size=160):
    x0, y0, x1, y1 = box
    return F.interpolate(img[..., y0:y1, x0:x1], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


@pytest.fixture(scope="module")
def faces(reference_dir, load_rgb):
    from skimage import data

    astro = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    girl = load_rgb(reference_dir / "calibration/ref_dir/I04.bmp")
    hanks = load_rgb(reference_dir / "faces/Tom_Hanks_54745.png")
    a = _crop(astro, (170, 50, 280, 180))
    degraded = F.interpolate(F.interpolate(a, scale_factor=0.25, mode="bilinear", antialias=True), size=(160, 160),
                             mode="bilinear")
    return {
        "astronaut": a,
        "astronaut_mirror": a.flip(-1),
        "astronaut_x4": degraded,
        "astronaut_shifted": _crop(astro, (160, 45, 275, 185)),
        "girl": _crop(girl, (130, 60, 420, 350)),
        "girl_mirror": _crop(girl, (130, 60, 420, 350)).flip(-1),
        "hanks": _crop(hanks, (0, 0, hanks.shape[-1], hanks.shape[-2])),
    }


def test_facenet_identity_separates_people(faces, metric_weights_dir):
    m = create_metric("ids_facenet", weights_dir=metric_weights_dir, crop=None)
    assert m.name == "ids_facenet" and m.lower_better
    a = faces["astronaut"]
    same = [m(faces[k], a).item() for k in ("astronaut_mirror", "astronaut_x4", "astronaut_shifted")]
    same.append(m(faces["girl_mirror"], faces["girl"]).item())
    different = [m(faces["girl"], a).item(), m(faces["hanks"], a).item(), m(faces["hanks"], faces["girl"]).item()]
    assert m(a, a).item() == pytest.approx(0.0, abs=0.1)
    assert max(same) < 55, same
    assert min(different) > 70, different
    assert max(same) + 15 < min(different)


def test_ids_requires_arcface_file_and_random_init_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"arcface_resnet18\.pth.*resnet18_110\.pth"):
        create_metric("ids", weights_dir=tmp_path)
    m = create_metric("ids", pretrained=False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g)
    y = torch.rand(2, 3, 64, 64, generator=g)
    assert m(x, x).max().item() < 1e-3
    d = m(x, y)
    assert d.shape == (2,) and (d > 0.01).all() and (d <= 180).all()
    # VQFR protocol: pairs under 1 degree are not averaged
    assert m.aggregate([0.5, 10.0, 20.0]) == pytest.approx(15.0)


def test_arcface_checkpoint_loading(tmp_path):
    """A resnet18_110-style checkpoint (DataParallel 'module.' keys, torch.save) loads and is used."""
    net = ArcFaceResNet().eval()
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "resnet18_110.pth")
    m = create_metric("ids", weights_dir=tmp_path)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(m.net(arcface_preprocess(x)), net(arcface_preprocess(x)))
    torch.save({"module.conv1.weight": torch.zeros(3)}, tmp_path / "resnet18_110.pth")
    with pytest.raises(ValueError, match="resnet18_110.pth"):
        create_metric("ids", weights_dir=tmp_path)


def test_identity_networks_are_differentiable():
    x = torch.rand(2, 3, 160, 160, requires_grad=True)
    net = InceptionResnetV1().eval()
    emb = net((x * 255 - 127.5) / 128)
    assert emb.shape == (2, 512)
    np.testing.assert_allclose(emb.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)
    emb.sum().backward()
    assert x.grad.abs().sum() > 0
    arc = ArcFaceResNet().eval()
    assert arc(arcface_preprocess(torch.rand(2, 3, 256, 256))).shape == (2, 512)
