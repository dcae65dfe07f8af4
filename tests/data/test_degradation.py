"""The degradation model: determinism, each stage's measurable effect, config and presets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from osdface.config import ConfigError
from osdface.data.degradation import (
    KERNEL_TYPES,
    PRESETS,
    DegradationConfig,
    Degrader,
    image_seed,
    load_degradation_config,
    make_kernel,
    resolve_degradation,
)

# Every stage off: the identity degradation, from which the tests switch on one stage at a time.
OFF = dict(blur_prob=0.0, downsample_range=(1.0, 1.0), noise_range=None, jpeg_range=None)


def only(**kw) -> Degrader:
    return Degrader(DegradationConfig(**{**OFF, **kw}))


@pytest.fixture(scope="module")
def face():
    """A real 128×128 RGB photo (skimage's astronaut, bundled offline), uint8."""
    from skimage import data

    return cv2.resize(data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)


def hf_energy(img: np.ndarray) -> float:
    """Mean squared Laplacian response: the high-frequency energy of an image."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float64)
    return float(np.mean(cv2.Laplacian(gray, cv2.CV_64F) ** 2))


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_result_and_different_seed_differs(face):
    deg = Degrader("daefr")
    lq1, p1 = deg(face, 123)
    lq2, p2 = deg(face, 123)
    lq3, p3 = deg(face, 124)
    assert np.array_equal(lq1, lq2) and p1 == p2
    assert p1 != p3 and not np.array_equal(lq1, lq3)


def test_result_independent_of_call_order(face):
    deg = Degrader("osediff-face")
    keys = [f"img_{i:03d}.png" for i in range(5)]
    forward = {k: deg(face, image_seed(7, k))[0] for k in keys}
    backward = {k: deg(face, image_seed(7, k))[0] for k in reversed(keys)}
    for k in keys:
        assert np.array_equal(forward[k], backward[k])


def test_input_is_not_modified(face):
    before = face.copy()
    Degrader("daefr")(face, 0)
    assert np.array_equal(face, before)


def test_params_replay_exactly_after_a_json_round_trip(face):
    cfg = DegradationConfig(kernel_list=tuple(KERNEL_TYPES), kernel_prob=(1,) * 6, poisson_prob=0.5,
                            color_jitter_prob=0.5, gray_prob=0.5)
    deg = Degrader(cfg)
    for seed in range(6):
        lq, params = deg(face, seed)
        replayed = deg.apply(face, json.loads(json.dumps(params)))
        assert np.array_equal(lq, replayed)


def test_image_seed_is_stable_across_processes():
    """Python's hash() is salted per process; image_seed must not be."""
    here = image_seed(3, "ffhq/00001.png", epoch=2)
    code = "from osdface.data.degradation import image_seed; print(image_seed(3, 'ffhq/00001.png', epoch=2))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout) == here
    assert 0 <= here < 2**63
    # every input matters
    assert len({here, image_seed(4, "ffhq/00001.png", 2), image_seed(3, "ffhq/00002.png", 2),
                image_seed(3, "ffhq/00001.png", 3)}) == 4


# ---------------------------------------------------------------------------------------------
# each stage's effect
# ---------------------------------------------------------------------------------------------


def test_everything_off_is_the_identity(face):
    lq, params = only()(face, 0)
    assert np.array_equal(lq, face)
    assert params["blur"] is None and params["noise"] is None and params["jpeg_quality"] is None


@pytest.mark.parametrize("kernel", sorted(KERNEL_TYPES))
def test_blur_lowers_high_frequency_energy_more_for_larger_sigma(face, kernel):
    energies = []
    for sigma in (1.0, 3.0, 8.0):
        lq, params = only(blur_prob=1.0, kernel_list=(kernel,), kernel_prob=(1.0,), blur_sigma=(sigma, sigma))(face, 0)
        assert params["blur"]["kernel"] == kernel and params["blur"]["sigma_x"] == sigma
        assert lq.shape == face.shape
        energies.append(hf_energy(lq))
    assert hf_energy(face) > energies[0] > energies[1] > energies[2]


def test_kernels_are_normalised_and_shaped_as_specified():
    for kernel in KERNEL_TYPES:
        k = make_kernel(kernel, 21, 2.0, 4.0, 0.3, beta=1.5)
        assert k.shape == (21, 21) and np.all(k >= 0) and math.isclose(k.sum(), 1.0, rel_tol=1e-9)
        assert np.unravel_index(np.argmax(k), k.shape) == (10, 10)
    iso = make_kernel("iso", 21, 2.0)
    assert np.allclose(iso, iso.T) and np.allclose(iso, np.outer(iso.sum(1), iso.sum(0)))
    # anisotropic: rotating by 90° swaps the axes
    k0, k90 = make_kernel("aniso", 21, 1.0, 4.0, 0.0), make_kernel("aniso", 21, 1.0, 4.0, math.pi / 2)
    assert np.allclose(k0, k90.T, atol=1e-12) and not np.allclose(k0, k0.T)
    # a Gaussian with σ≈2 has ~95 % of its mass inside a 3σ box; its x-variance is σ²
    xs = np.arange(-10, 11)
    assert math.isclose(float((iso.sum(0) * xs**2).sum()), 4.0, rel_tol=0.01)
    with pytest.raises(ValueError, match="unknown kernel type 'box'; choose from"):
        make_kernel("box", 21, 1.0)


def test_gaussian_noise_has_the_drawn_sigma():
    flat = np.full((256, 256, 3), 128, np.uint8)
    deg = only(noise_range=(2.0, 20.0))
    sigmas = []
    for seed in range(4):
        lq, params = deg(flat, seed)
        sigma = params["noise"]["sigma"]
        assert params["noise"]["type"] == "gaussian" and 2.0 <= sigma <= 20.0
        residual = lq.astype(np.float64) - flat
        # rounding to uint8 adds a uniform error of variance 1/12
        measured = math.sqrt(max(residual.var() - 1.0 / 12.0, 0.0))
        assert measured == pytest.approx(sigma, rel=0.03, abs=0.1)
        assert abs(residual.mean()) < 0.2  # zero-mean
        # colour noise: the channels are independent
        assert abs(np.corrcoef(residual[..., 0].ravel(), residual[..., 1].ravel())[0, 1]) < 0.05
        sigmas.append(sigma)
    assert len(set(sigmas)) == 4


def test_gray_noise_is_identical_in_all_channels():
    flat = np.full((64, 64, 3), 100, np.uint8)
    lq, params = only(noise_range=(10.0, 10.0), gray_noise_prob=1.0)(flat, 0)
    assert params["noise"]["gray"] is True
    assert np.array_equal(lq[..., 0], lq[..., 1]) and np.array_equal(lq[..., 1], lq[..., 2])
    assert lq.std() > 5


def test_poisson_noise_variance_follows_the_signal():
    # 128 distinct grey levels → BasicSR counts 2**ceil(log2(128)) = 128 photon levels.
    rng = np.random.default_rng(0)
    img = rng.integers(64, 192, size=(256, 256, 3), dtype=np.uint8)
    img[0, 0, :3] = np.arange(64, 67)
    assert len(np.unique(img)) == 128
    lq, params = only(noise_range=(0.0, 20.0), poisson_prob=1.0, poisson_scale_range=(0.5, 1.0))(img, 1)
    scale = params["noise"]["scale"]
    assert params["noise"]["type"] == "poisson" and 0.5 <= scale <= 1.0
    x = img.astype(np.float64) / 255.0
    expected = scale * np.sqrt(x / 128.0) * 255.0  # per-pixel std of scale·(Poisson(128x)/128 − x)
    residual = lq.astype(np.float64) - img
    assert math.sqrt(residual.var() - 1 / 12) == pytest.approx(math.sqrt((expected**2).mean()), rel=0.03)
    bright, dark = x > 0.6, x < 0.35
    assert residual[bright].std() > residual[dark].std() * 1.2  # shot noise grows with intensity


def test_jpeg_matches_opencv_and_lower_quality_means_larger_error(face):
    errors = {}
    for q in (20, 50, 80, 95):
        lq, params = only(jpeg_range=(q, q))(face, 0)
        assert params["jpeg_quality"] == q
        ok, buf = cv2.imencode(".jpg", face[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        assert np.array_equal(lq, cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
        errors[q] = float(np.mean((lq.astype(np.float64) - face) ** 2))
    assert errors[20] > errors[50] > errors[80] > errors[95] > 0
    qs = {only(jpeg_range=(30, 40))(face, s)[1]["jpeg_quality"] for s in range(40)}
    assert qs <= set(range(30, 41)) and {30, 40} <= qs  # integer qualities, both ends included


@pytest.mark.parametrize("shape", [(37, 53, 3), (128, 128, 3), (9, 300, 3)])
def test_down_and_up_sampling_keeps_size(shape, face):
    img = cv2.resize(face, (shape[1], shape[0]))
    for r in (0.8, 2.5, 8.0, 30.0):
        lq, params = only(downsample_range=(r, r))(img, 0)
        assert lq.shape == img.shape and lq.dtype == np.uint8
        assert params["lq_size"] == [max(1, int(shape[0] // r)), max(1, int(shape[1] // r))]


def test_downsampling_removes_detail_monotonically(face):
    energies = [hf_energy(only(downsample_range=(r, r))(face, 0)[0]) for r in (2.0, 4.0, 8.0)]
    assert hf_energy(face) > energies[0] > energies[1] > energies[2]


def test_color_jitter_shifts_each_channel_by_the_drawn_offset():
    flat = np.full((32, 32, 3), 120, np.uint8)
    lq, params = only(color_jitter_prob=1.0, color_jitter_shift=20.0)(flat, 5)
    shift = params["color_shift"]
    assert len(shift) == 3 and all(-20 <= s <= 20 for s in shift)
    assert np.allclose(lq.reshape(-1, 3).mean(0), 120 + np.asarray(shift), atol=0.51)


def test_gray_conversion_makes_the_channels_equal(face):
    lq, params = only(gray_prob=1.0)(face, 0)
    assert params["gray"] is True
    assert np.array_equal(lq[..., 0], lq[..., 2])
    expected = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    assert np.abs(lq[..., 0].astype(int) - expected).max() <= 1


def test_full_preset_pipeline_degrades(face):
    for name in PRESETS:
        lq, _ = Degrader(name)(face, 11)
        assert lq.shape == face.shape and lq.dtype == np.uint8
        assert hf_energy(lq) < hf_energy(face)


def test_rejects_non_uint8_rgb():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        Degrader("daefr")(np.zeros((8, 8, 3), np.float32), 0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        Degrader("daefr")(np.zeros((8, 8), np.uint8), 0)


# ---------------------------------------------------------------------------------------------
# presets and config
# ---------------------------------------------------------------------------------------------

SPEC_TABLE = {  # spec §7: kernel size, σ, r, δ, q
    "daefr": (41, (0.1, 10.0), (0.8, 8.0), (0.0, 20.0), (60, 100)),
    "osediff-face": (41, (1.0, 15.0), (1.0, 30.0), (0.0, 20.0), (30, 100)),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_presets_draw_within_the_spec_ranges(name):
    size, sigma, r, delta, q = SPEC_TABLE[name]
    cfg = PRESETS[name]
    assert (cfg.kernel_size, cfg.blur_sigma, cfg.downsample_range, cfg.noise_range, cfg.jpeg_range) == (
        size, sigma, r, delta, q)
    assert cfg.kernel_list == ("iso", "aniso") and cfg.kernel_prob == (0.5, 0.5)
    deg = Degrader(cfg)
    kinds = []
    draws = [deg.sample_params(image_seed(0, f"{i}.png"), 512, 512) for i in range(400)]
    for p in draws:
        b = p["blur"]
        kinds.append(b["kernel"])
        assert b["kernel_size"] == size and sigma[0] <= b["sigma_x"] <= sigma[1] and sigma[0] <= b["sigma_y"] <= sigma[1]
        if b["kernel"] == "iso":
            assert b["sigma_x"] == b["sigma_y"] and b["theta"] == 0.0
        assert r[0] <= p["scale"] <= r[1] and p["lq_size"] == [int(512 // p["scale"])] * 2
        assert delta[0] <= p["noise"]["sigma"] <= delta[1]
        assert q[0] <= p["jpeg_quality"] <= q[1]
        assert p["color_shift"] is None and p["gray"] is False
    assert 0.4 < kinds.count("iso") / len(kinds) < 0.6
    # the draws cover the ranges (not stuck at one value)
    scales = [p["scale"] for p in draws]
    assert min(scales) < r[0] + 0.1 * (r[1] - r[0]) and max(scales) > r[1] - 0.1 * (r[1] - r[0])


def test_config_validation_names_the_problem():
    # values are checked however the config is built (direct construction too); keys relative to the section
    with pytest.raises(ConfigError, match=r"kernel_list: unknown kernel type 'box'; choose from"):
        DegradationConfig(kernel_list=("box",), kernel_prob=(1.0,))
    with pytest.raises(ConfigError, match="kernel_size must be odd, got 40"):
        DegradationConfig(kernel_size=40)
    with pytest.raises(ConfigError, match="blur_sigma: low 5 is above high 1"):
        DegradationConfig(blur_sigma=(5, 1))
    with pytest.raises(ConfigError, match="kernel_prob has 1 entries"):
        DegradationConfig(kernel_prob=(1.0,))
    with pytest.raises(ConfigError, match="interpolation: unknown interpolation 'lanczos9'; choose from"):
        DegradationConfig(interpolation="lanczos9")
    with pytest.raises(ConfigError, match=r"gray_prob must be ≤ 1, got 1\.5 \(bound in .*DEGRADATION_BOUNDS\)"):
        DegradationConfig(gray_prob=1.5)
    with pytest.raises(ConfigError, match=r"jpeg_range\[1\] must be ≤ 100, got 101"):
        DegradationConfig(jpeg_range=(30, 101))
    with pytest.raises(ConfigError, match=r"blur_sigma\[0\] must be ≥ 1e-06, got 0"):
        DegradationConfig(blur_sigma=(0, 1))
    # the shared checker (osdface.config.from_dict): unknown keys with a suggestion, types
    with pytest.raises(ConfigError, match=r"unknown config key 'blur_sigmaa' \(did you mean 'blur_sigma'\?\)"):
        DegradationConfig.from_dict({"blur_sigmaa": [1, 2]})
    with pytest.raises(ConfigError, match=r"noise_range: expected a list, got int 5 \(or null\)"):
        DegradationConfig.from_dict({"noise_range": 5})
    with pytest.raises(ConfigError, match=r"blur_sigma: expected 2 items, got 3"):
        DegradationConfig.from_dict({"blur_sigma": [1, 2, 3]})
    with pytest.raises(ConfigError, match=r"jpeg_range\[0\]: expected a number, got True"):
        DegradationConfig.from_dict({"jpeg_range": [True, 100]})
    with pytest.raises(ConfigError, match="kernel_size: expected an integer, got 41.0"):
        DegradationConfig.from_dict({"kernel_size": 41.0})
    with pytest.raises(ConfigError, match=r"kernel_list\[0\]: expected a string, got 1"):
        DegradationConfig.from_dict({"kernel_list": [1]})
    with pytest.raises(ConfigError, match="unknown degradation preset 'nope'; choose from"):
        resolve_degradation("nope")
    with pytest.raises(ConfigError, match=r"preset: unknown degradation preset 'nope'; choose from"):
        resolve_degradation({"preset": "nope"})
    assert issubclass(ConfigError, ValueError)


def test_numbers_keep_their_type_and_presets_resolve():
    """An int stays an int (the manifest records values as written); lists become tuples."""
    cfg = DegradationConfig.from_dict({"jpeg_range": [40, 50], "blur_sigma": [1, 2.5], "kernel_prob": [1, 1],
                                       "blur_prob": "1e-1"})
    assert cfg.jpeg_range == (40, 50) and all(type(v) is int for v in cfg.jpeg_range)
    assert type(cfg.blur_sigma[0]) is int and cfg.blur_sigma[1] == 2.5 and cfg.blur_prob == 0.1
    assert cfg.to_dict()["kernel_prob"] == [1, 1]
    assert resolve_degradation("osediff-face") is PRESETS["osediff-face"]
    assert resolve_degradation({"preset": "osediff-face"}) == PRESETS["osediff-face"]
    assert resolve_degradation({"preset": "osediff-face", "jpeg_range": None}).jpeg_range is None
    assert DegradationConfig.from_dict({"jpeg_range": [1, 2]}, base=PRESETS["osediff-face"]).blur_sigma == (1.0, 15.0)
    assert DegradationConfig() == PRESETS["daefr"]


def test_config_dict_and_yaml_round_trip(tmp_path):
    cfg = PRESETS["osediff-face"]
    assert DegradationConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    path = tmp_path / "mine.yaml"
    path.write_text("preset: daefr\nnoise_range: null\njpeg_range: [40, 50]\nkernel_list: [iso]\nkernel_prob: [1]\n")
    loaded = load_degradation_config(path)
    assert loaded.noise_range is None and loaded.jpeg_range == (40, 50) and loaded.kernel_list == ("iso",)
    assert loaded.blur_sigma == PRESETS["daefr"].blur_sigma  # inherited from the preset
    assert resolve_degradation(str(path)) == loaded
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: daefr\nsigma: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'sigma' \(did you mean 'blur_sigma'\?\)"):
        load_degradation_config(bad)
    bad.write_text("preset: strong\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: preset: unknown degradation preset 'strong'; choose from"):
        load_degradation_config(bad)
    bad.write_text("blur_sigma: [5, 1]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: blur_sigma: low 5 is above high 1"):
        resolve_degradation(bad)
    bad.write_text("blur_sigma: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_degradation_config(bad)
    with pytest.raises(ConfigError, match=r"missing\.yaml not found") as info:
        load_degradation_config(tmp_path / "missing.yaml")
    assert isinstance(info.value, FileNotFoundError)


def test_shipped_yaml_presets_equal_the_python_presets():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "configs" / "degradations"
    files = sorted(folder.glob("*.yaml"))
    assert {f.stem for f in files} == set(PRESETS)
    for f in files:
        assert load_degradation_config(f) == PRESETS[f.stem], f
