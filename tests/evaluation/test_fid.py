import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osdface.evaluation import create_metric
from osdface.evaluation.fid import folder_features, frechet_distance, statistics


def _tiles(reference_dir, load_rgb):
    """20 crops (4 per calibration reference image) of 192x192."""
    out = []
    for n in ("I03", "I04", "I06", "I08", "I19"):
        img = load_rgb(reference_dir / f"calibration/ref_dir/{n}.bmp")  # (1, 3, 384, 512)
        for y, x in ((0, 0), (0, 256), (192, 0), (192, 256)):
            out.append(img[..., y:y + 192, x:x + 192])
    return torch.cat(out)


def _blur(x, sigma):
    k = int(2 * round(3 * sigma) + 1)
    ax = torch.arange(k) - k // 2
    g = torch.exp(-(ax.float() ** 2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(3, 1, k, k)
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="reflect"), w, groups=3).clamp(0, 1)


def test_frechet_distance_analytic():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=4)
    sigma = np.eye(4)
    # same covariance: FID = ||mu1 - mu2||^2
    assert frechet_distance(mu, sigma, mu + 1.0, sigma) == pytest.approx(4.0, abs=1e-9)
    # diagonal covariances: sum (s1 + s2 - 2 sqrt(s1 s2))
    assert frechet_distance(mu, np.diag([1.0, 4, 9, 16]), mu, np.eye(4)) == pytest.approx(0 + 1 + 4 + 9, abs=1e-6)
    # the fast path equals pytorch-fid's sqrtm implementation on rank-deficient covariances
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(30, 64)) * 1.5 + 0.3
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(frechet_distance(*args, method="sqrtm"), rel=1e-6)


def test_fid_identical_zero_and_grows_with_blur(reference_dir, metric_weights_dir, load_rgb):
    fid = create_metric("fid", weights_dir=metric_weights_dir)
    assert fid.set_level and fid.lower_better
    real = _tiles(reference_dir, load_rgb)
    f_real = fid.features(real)
    assert f_real.shape == (20, 2048)
    assert fid.distance(f_real, f_real) == pytest.approx(0.0, abs=1e-3)
    blurred = [fid.features(_blur(real, s)) for s in (0.8, 2.0, 4.0)]
    scores = [fid.distance(f, f_real) for f in blurred]
    assert scores[0] > 1.0
    assert scores[0] < scores[1] < scores[2], scores
    # statistics path (e.g. FID against FFHQ stats) gives the same number as the feature path
    assert fid.distance(blurred[1], statistics(f_real)) == pytest.approx(scores[1], rel=1e-9)


def test_fid_folder_cache(tmp_path, reference_dir, metric_weights_dir):
    fid = create_metric("fid", weights_dir=metric_weights_dir)
    files = sorted((reference_dir / "calibration/ref_dir").glob("*.bmp"))[:3]
    cache = tmp_path / "cache"
    a = folder_features(files, fid.model, fid.weights_id, cache_dir=cache)
    cached = list(cache.glob("*.npy"))
    assert len(cached) == 1
    # a cache hit returns the stored array (prove it by planting a marker value)
    np.save(cached[0], np.full_like(a, 7.0))
    assert (folder_features(files, fid.model, fid.weights_id, cache_dir=cache) == 7.0).all()
    # a different file list is a different key
    folder_features(files[:2], fid.model, fid.weights_id, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 2
