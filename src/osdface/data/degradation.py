"""Seeded synthetic degradations for blind face restoration (docs/method.md §7).

The classical face-restoration degradation model (GFPGAN / CodeFormer / DAEFR / OSEDiff-face)::

    lq = [ (hq ⊛ k_σ)↓r + n_δ ]_JPEG_q ↑r

blur with a random kernel, bilinear down-sample by ``r``, additive noise, JPEG at quality ``q``,
bilinear up-sample back to the input size; optionally followed by a colour shift and a grayscale
conversion of the LQ image.

Provenance: a NumPy/OpenCV re-implementation of the kernel and noise functions of BasicSR
``basicsr/data/degradations.py`` (Apache-2.0, XPixelGroup; the kernel formulas, the Poisson
"number of grey levels" trick and the two-sided beta draw follow it) and of the ordering in
BasicSR/GFPGAN ``FFHQDegradationDataset.__getitem__``. We do not import ``basicsr`` (its
``torchvision.transforms.functional_tensor`` import is broken on current torchvision) and we
replace its global ``np.random``/``random`` state with a per-image generator, so that a result
depends only on ``(config, seed)`` — not on call order, worker processes or batch composition.

Determinism contract:

* :meth:`Degrader.sample_params` draws every random quantity (including a ``noise_seed`` for the
  noise field) from ``numpy.random.default_rng(seed)``;
* :meth:`Degrader.apply` is a pure function of ``(hq, params)``, so a manifest of the drawn
  parameters replays an image exactly;
* :func:`image_seed` derives a per-image seed from a global seed, a stable image identity (the
  relative path) and the epoch, with BLAKE2b (not Python's salted ``hash``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import cv2
import numpy as np

from ..config import Bound, ConfigError, check_bounds, from_dict, load_config, to_dict
from ..image import bgr_to_rgb, rgb_to_bgr

__all__ = [
    "DEGRADATION_BOUNDS",
    "KERNEL_TYPES",
    "INTERPOLATIONS",
    "PRESETS",
    "DegradationConfig",
    "Degrader",
    "image_seed",
    "load_degradation_config",
    "make_kernel",
    "resolve_degradation",
]

# ----------------------------------------------------------------------------------------------
# Blur kernels (BasicSR degradations.py: mesh_grid / sigma_matrix2 / pdf2 / bivariate_*)
# ----------------------------------------------------------------------------------------------


def _mesh_grid(kernel_size: int) -> np.ndarray:
    """``(K, K, 2)`` float64 grid of (x, y) offsets centred on zero."""
    ax = np.arange(-kernel_size // 2 + 1.0, kernel_size // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)


def _quadratic_form(kernel_size: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    """``(K, K)`` Mahalanobis distance ``p^T Σ^{-1} p`` with ``Σ = R diag(σx², σy²) R^T``."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    sigma = rot @ np.diag([sig_x**2, sig_y**2]) @ rot.T
    inv = np.linalg.inv(sigma)
    grid = _mesh_grid(kernel_size)  # (K, K, 2)
    return np.einsum("hwi,ij,hwj->hw", grid, inv, grid)  # (K, K)


def _gaussian(d2: np.ndarray, beta: float) -> np.ndarray:
    return np.exp(-0.5 * d2)


def _generalized_gaussian(d2: np.ndarray, beta: float) -> np.ndarray:
    return np.exp(-0.5 * np.power(d2, beta))


def _plateau(d2: np.ndarray, beta: float) -> np.ndarray:
    return np.reciprocal(np.power(d2, beta) + 1.0)


#: kernel type → (profile function of the squared distance, isotropic?, uses beta?).
KERNEL_TYPES: dict[str, tuple[Any, bool, bool]] = {
    "iso": (_gaussian, True, False),
    "aniso": (_gaussian, False, False),
    "generalized_iso": (_generalized_gaussian, True, True),
    "generalized_aniso": (_generalized_gaussian, False, True),
    "plateau_iso": (_plateau, True, True),
    "plateau_aniso": (_plateau, False, True),
}


def make_kernel(
    kernel_type: str, kernel_size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
    beta: float = 1.0,
) -> np.ndarray:
    """Build a normalised 2-D blur kernel.

    Args:
        kernel_type: one of :data:`KERNEL_TYPES` (``iso``, ``aniso``, ``generalized_iso``,
            ``generalized_aniso``, ``plateau_iso``, ``plateau_aniso``).
        kernel_size: odd side length ``K``.
        sigma_x, sigma_y: standard deviations in pixels along the kernel's own axes
            (``sigma_y`` and ``theta`` are ignored by isotropic types).
        theta: rotation in radians.
        beta: shape parameter of the generalized-Gaussian / plateau types (1 = Gaussian-like).

    Returns:
        ``(K, K)`` float64 kernel with non-negative entries summing to 1.
    """
    if kernel_type not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kernel_type!r}; choose from {sorted(KERNEL_TYPES)}")
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    profile, isotropic, _ = KERNEL_TYPES[kernel_type]
    if isotropic or sigma_y is None:
        sigma_y, theta = sigma_x, 0.0
    kernel = profile(_quadratic_form(kernel_size, sigma_x, sigma_y, theta), beta)
    return kernel / kernel.sum()


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

#: resampling name → OpenCV flag, for the ↓r / ↑r steps (the references use bilinear).
INTERPOLATIONS: dict[str, int] = {
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
}

Number = Union[int, float]  # an int stays an int (a manifest records the value as it was given)
Range = tuple[Number, Number]

_TABLE = "osdface.data.degradation.DEGRADATION_BOUNDS"

#: Plausible values of the :class:`DegradationConfig` fields, by field name (for a range, of both
#: ends); checked by the shared :func:`osdface.config.check_bounds`.
DEGRADATION_BOUNDS: dict[str, Bound] = {
    "kernel_size": Bound(1),
    "kernel_list": Bound(min_items=1),
    "kernel_prob": Bound(0),
    "blur_sigma": Bound(1e-6),
    "betag_range": Bound(1e-6),
    "betap_range": Bound(1e-6),
    "blur_prob": Bound(0, 1),
    "downsample_range": Bound(1e-6),
    "noise_range": Bound(0),
    "poisson_prob": Bound(0, 1),
    "poisson_scale_range": Bound(0),
    "gray_noise_prob": Bound(0, 1),
    "jpeg_range": Bound(1, 100),
    "color_jitter_prob": Bound(0, 1),
    "color_jitter_shift": Bound(0),
    "gray_prob": Bound(0, 1),
}

_RANGES = ("blur_sigma", "rotation_range", "betag_range", "betap_range", "downsample_range", "noise_range",
           "poisson_scale_range", "jpeg_range")


@dataclass(frozen=True)
class DegradationConfig:
    """Every range and probability of the synthetic degradation (docs/method.md §7).

    A frozen config section checked by the shared machinery of :mod:`osdface.config`: built from
    YAML with :func:`~osdface.config.from_dict` (unknown keys raise with a suggestion, types are
    checked), its values checked against :data:`DEGRADATION_BOUNDS` however it is built. Where a
    config is read, a preset name stands for that preset, and a mapping may start from
    ``preset: NAME`` (:meth:`config_input`). In a training config it is the ``data.degradation``
    section (``--set data.degradation.blur_sigma=[0.1,10]``, ``--set data.degradation=osediff-face``).

    All noise levels and the colour shift are on the 0–255 scale, as in BasicSR/GFPGAN.
    Set ``blur_prob=0``, ``downsample_range=(1, 1)``, ``noise_range=None`` or ``jpeg_range=None``
    to switch a stage off. The defaults are the ``daefr`` preset.

    Attributes:
        kernel_size: odd blur-kernel side (DAEFR/CodeFormer/OSEDiff use 41).
        kernel_list: kernel types to choose from (keys of :data:`KERNEL_TYPES`).
        kernel_prob: their relative probabilities (same length as ``kernel_list``).
        blur_sigma: σ range in pixels, used for both axes of anisotropic kernels.
        rotation_range: anisotropic kernel angle range in radians.
        betag_range: shape-parameter range of generalized-Gaussian kernels.
        betap_range: shape-parameter range of plateau kernels.
        blur_prob: probability of applying the blur at all.
        downsample_range: down-sampling factor range ``r`` (``r < 1`` enlarges, as in DAEFR).
        interpolation: resampling for ↓r and ↑r (:data:`INTERPOLATIONS`).
        noise_range: Gaussian noise σ range (0–255 scale), or ``None`` for no noise.
        poisson_prob: probability of Poisson (shot) noise instead of Gaussian noise.
        poisson_scale_range: Poisson noise scale range (Real-ESRGAN uses [0.05, 3]).
        gray_noise_prob: probability that the noise is the same in all three channels.
        jpeg_range: JPEG quality range (integers, inclusive), or ``None`` for no JPEG.
        color_jitter_prob: probability of a per-channel additive colour shift of the LQ image.
        color_jitter_shift: maximum shift (0–255 scale) of that colour jitter.
        gray_prob: probability of converting the LQ image to (3-channel) grayscale.
    """

    kernel_size: int = 41
    kernel_list: tuple[str, ...] = ("iso", "aniso")
    kernel_prob: tuple[Number, ...] = (0.5, 0.5)
    blur_sigma: Range = (0.1, 10.0)
    rotation_range: Range = (-math.pi, math.pi)
    betag_range: Range = (0.5, 4.0)
    betap_range: Range = (1.0, 2.0)
    blur_prob: Number = 1.0
    downsample_range: Range = (0.8, 8.0)
    interpolation: str = "bilinear"
    noise_range: Range | None = (0.0, 20.0)
    poisson_prob: Number = 0.0
    poisson_scale_range: Range = (0.05, 3.0)
    gray_noise_prob: Number = 0.0
    jpeg_range: Range | None = (60, 100)
    color_jitter_prob: Number = 0.0
    color_jitter_shift: Number = 20.0
    gray_prob: Number = 0.0

    def __post_init__(self) -> None:
        # Normalise list → tuple (a direct caller may pass lists) so the frozen config stays hashable.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        # Values only: types are the shared from_dict's job. Keys are relative to this section
        # (from_dict roots them, e.g. at data.degradation).
        check_bounds(self, "", DEGRADATION_BOUNDS, _TABLE)
        if self.kernel_size % 2 != 1:
            raise ConfigError(f"kernel_size must be odd, got {self.kernel_size!r}", key="kernel_size")
        for k in self.kernel_list:
            if k not in KERNEL_TYPES:
                raise ConfigError(f"kernel_list: unknown kernel type {k!r}; choose from {sorted(KERNEL_TYPES)}",
                                  key="kernel_list")
        if len(self.kernel_prob) != len(self.kernel_list):
            raise ConfigError(f"kernel_prob has {len(self.kernel_prob)} entries but kernel_list has "
                              f"{len(self.kernel_list)}", key="kernel_prob")
        if sum(self.kernel_prob) <= 0:
            raise ConfigError(f"kernel_prob must have a positive sum, got {self.kernel_prob}", key="kernel_prob")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation: unknown interpolation {self.interpolation!r}; choose from "
                              f"{sorted(INTERPOLATIONS)}", key="interpolation")
        for name in _RANGES:
            rng = getattr(self, name)
            if rng is None and name in ("noise_range", "jpeg_range"):
                continue
            if not isinstance(rng, tuple) or len(rng) != 2:
                raise ConfigError(f"{name} must be a (low, high) pair, got {rng!r}", key=name)
            lo, hi = rng
            if not lo <= hi:
                raise ConfigError(f"{name}: low {lo} is above high {hi}", key=name)

    @classmethod
    def config_input(cls, value: Any, key: str = "") -> Any:
        """What a config may write for this section → the mapping of its fields (the hook of
        :func:`osdface.config.from_dict` and :func:`~osdface.config.apply_overrides`).

        A preset name → that preset's fields; a ``.yaml``/``.yml`` path → the fields of that
        degradation file (:func:`load_degradation_config`); a mapping with ``preset: NAME`` →
        the preset's fields updated with the mapping's other keys. Anything else is returned
        unchanged (the shared checker judges it).

        Raises:
            ConfigError: an unknown preset, or an invalid degradation file (named).
        """
        where = f"{key}: " if key else ""
        if isinstance(value, (str, os.PathLike)):
            if isinstance(value, str) and value in PRESETS:
                return PRESETS[value].to_dict()
            if str(value).endswith((".yaml", ".yml")):
                return load_degradation_config(value).to_dict()
            raise ConfigError(f"{where}unknown degradation preset {str(value)!r}; choose from {sorted(PRESETS)} "
                              "or give a .yaml file", key=key or None)
        if isinstance(value, Mapping) and "preset" in value:
            rest = {k: v for k, v in value.items() if k != "preset"}
            name = value["preset"]
            if not isinstance(name, str) or name not in PRESETS:
                pkey = f"{key}.preset" if key else "preset"
                raise ConfigError(f"{pkey}: unknown degradation preset {name!r}; choose from {sorted(PRESETS)}",
                                  key=pkey)
            return {**PRESETS[name].to_dict(), **rest}
        return value

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict in field order (tuples become lists)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any, base: DegradationConfig | None = None) -> DegradationConfig:
        """Build a config from a mapping (e.g. parsed YAML; may start from ``preset: NAME``) or a
        preset name, with the shared checker :func:`osdface.config.from_dict`; the mapping's keys
        override ``base`` (when given).

        Raises:
            ConfigError: unknown keys (with a suggestion), wrongly typed or out-of-range values,
                naming the key.
        """
        if base is not None and isinstance(data, Mapping):
            data = {**base.to_dict(), **cls.config_input(data)}
        return from_dict(cls, data)


#: Named presets. ``daefr``: DAEFR ``configs/*.yaml`` / ``ffhq_degradation_dataset.py`` ranges
#: (CelebA-Test style; DAEFR draws the kernel size from {39, 41}, we fix 41).
#: ``osediff-face``: OSEDiff ``dataloaders/params_codeformer.yml`` (CodeFormer's ranges).
#: ``configs/degradations/<name>.yaml`` hold the same values.
PRESETS: dict[str, DegradationConfig] = {
    "daefr": DegradationConfig(
        kernel_size=41, kernel_list=("iso", "aniso"), kernel_prob=(0.5, 0.5), blur_sigma=(0.1, 10.0),
        downsample_range=(0.8, 8.0), noise_range=(0.0, 20.0), jpeg_range=(60, 100),
    ),
    "osediff-face": DegradationConfig(
        kernel_size=41, kernel_list=("iso", "aniso"), kernel_prob=(0.5, 0.5), blur_sigma=(1.0, 15.0),
        downsample_range=(1.0, 30.0), noise_range=(0.0, 20.0), jpeg_range=(30, 100),
    ),
}


def load_degradation_config(path: str | os.PathLike) -> DegradationConfig:
    """Read a YAML file into a :class:`DegradationConfig` (the shared :func:`osdface.config.load_config`).

    The file is a mapping of :class:`DegradationConfig` fields; an optional ``preset: NAME`` key
    starts from that preset and the other keys override it.

    Raises:
        ConfigError: unreadable or missing file (:class:`~osdface.config.ConfigFileNotFoundError`,
            a ``FileNotFoundError`` too), unknown preset or key, bad value (the message names the
            file and the key); a ``ValueError`` too.
    """
    return load_config(DegradationConfig, path)


DegradationSpec = Union[str, os.PathLike, DegradationConfig, Mapping]


def resolve_degradation(spec: DegradationSpec) -> DegradationConfig:
    """A preset name, a YAML path, a mapping (optionally with ``preset: NAME``) or a config →
    :class:`DegradationConfig`.

    Raises:
        ConfigError: an unknown preset, an invalid file or mapping (naming the key).
    """
    if isinstance(spec, DegradationConfig):
        return spec
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    return from_dict(DegradationConfig, spec)


# ----------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------


def image_seed(seed: int, key: str, epoch: int = 0) -> int:
    """Per-image seed from (global seed, stable image identity, epoch).

    Args:
        seed: global non-negative integer seed.
        key: stable identity of the image, normally its POSIX relative path in the dataset root.
        epoch: training epoch (0 for fixed test sets).

    Returns:
        A non-negative 63-bit integer (BLAKE2b; identical across processes, platforms and runs).
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    digest = hashlib.blake2b(f"{int(seed)}\x00{int(epoch)}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------------------------
# The degrader
# ----------------------------------------------------------------------------------------------


def _draw_beta(rng: np.random.Generator, lo: float, hi: float) -> float:
    # BasicSR: when the range straddles 1, pick [lo, 1] or [1, hi] with equal probability.
    if lo < 1.0 < hi:
        return float(rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi))
    return float(rng.uniform(lo, hi))


@dataclass
class Degrader:
    """Apply the seeded degradation ``[ (hq ⊛ k)↓r + n ]_JPEG ↑r`` (+ colour jitter / gray).

    Example::

        deg = Degrader(PRESETS["daefr"])
        lq, params = deg(hq_rgb_uint8, seed=image_seed(0, "00001.png"))

    Args:
        config: the ranges; a :class:`DegradationConfig` or a preset name.
    """

    config: DegradationConfig = field(default_factory=lambda: PRESETS["daefr"])

    def __post_init__(self) -> None:
        self.config = resolve_degradation(self.config)

    # -- 1. parameters --------------------------------------------------------------------------
    def sample_params(self, seed: int | np.random.Generator, height: int, width: int) -> dict[str, Any]:
        """Draw every random quantity for one ``height × width`` image.

        Returns a JSON-serialisable dict: ``blur`` (``None`` or kernel type/size/σx/σy/θ/β),
        ``scale`` (r), ``lq_size`` ([h, w] after ↓r), ``noise`` (``None`` or type, σ or scale,
        gray), ``noise_seed``, ``jpeg_quality`` (``None`` or int), ``color_shift`` (``None`` or
        3 RGB offsets, 0–255 scale), ``gray`` (bool).
        """
        cfg = self.config
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        params: dict[str, Any] = {}
        # blur
        blur = None
        if rng.random() < cfg.blur_prob:
            probs = np.asarray(cfg.kernel_prob, dtype=np.float64)
            ktype = cfg.kernel_list[int(rng.choice(len(cfg.kernel_list), p=probs / probs.sum()))]
            _, isotropic, uses_beta = KERNEL_TYPES[ktype]
            sx = float(rng.uniform(*cfg.blur_sigma))
            sy, theta = (sx, 0.0) if isotropic else (float(rng.uniform(*cfg.blur_sigma)),
                                                     float(rng.uniform(*cfg.rotation_range)))
            beta = None
            if uses_beta:
                beta = _draw_beta(rng, *(cfg.betag_range if ktype.startswith("generalized") else cfg.betap_range))
            blur = {"kernel": ktype, "kernel_size": cfg.kernel_size, "sigma_x": sx, "sigma_y": sy,
                    "theta": theta, "beta": beta}
        params["blur"] = blur
        # down-sampling (BasicSR: int(w // r), at least one pixel)
        r = float(rng.uniform(*cfg.downsample_range))
        params["scale"] = r
        params["lq_size"] = [max(1, int(height // r)), max(1, int(width // r))]
        # noise
        noise = None
        if cfg.noise_range is not None:
            gray = bool(rng.random() < cfg.gray_noise_prob)
            if rng.random() < cfg.poisson_prob:
                noise = {"type": "poisson", "scale": float(rng.uniform(*cfg.poisson_scale_range)), "gray": gray}
            else:
                noise = {"type": "gaussian", "sigma": float(rng.uniform(*cfg.noise_range)), "gray": gray}
        params["noise"] = noise
        params["noise_seed"] = int(rng.integers(0, 2**63 - 1))
        # JPEG (integer quality, inclusive range)
        params["jpeg_quality"] = (
            None if cfg.jpeg_range is None
            else int(rng.integers(int(round(cfg.jpeg_range[0])), int(round(cfg.jpeg_range[1])) + 1))
        )
        # colour jitter and grayscale of the LQ image
        shift = None
        if rng.random() < cfg.color_jitter_prob:
            s = cfg.color_jitter_shift
            shift = [float(v) for v in rng.uniform(-s, s, 3)]
        params["color_shift"] = shift
        params["gray"] = bool(rng.random() < cfg.gray_prob)
        return params

    # -- 2. application -------------------------------------------------------------------------
    def apply(self, hq: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """Degrade ``hq`` with fixed ``params`` (pure: same inputs → same output).

        Args:
            hq: ``(H, W, 3)`` uint8 RGB image (not modified).
            params: a dict from :meth:`sample_params` (or a manifest record).

        Returns:
            ``(H, W, 3)`` uint8 RGB LQ image, the same size as ``hq``.
        """
        _check_hq(hq)
        h, w = hq.shape[:2]
        interp = INTERPOLATIONS[self.config.interpolation]
        img = hq.astype(np.float32) * np.float32(1.0 / 255.0)  # (H, W, 3) float32 in [0, 1]
        # 1. blur (cv2.filter2D = correlation with reflect-101 borders, as BasicSR)
        blur = params.get("blur")
        if blur:
            kernel = make_kernel(blur["kernel"], int(blur["kernel_size"]), blur["sigma_x"], blur["sigma_y"],
                                 blur["theta"], 1.0 if blur.get("beta") is None else blur["beta"])
            img = _filter(img, _trim_kernel(kernel), separable=blur["kernel"] == "iso")
        # 2. down-sample by r
        lh, lw = (int(v) for v in params["lq_size"])
        if (lh, lw) != (h, w):
            img = cv2.resize(img, (lw, lh), interpolation=interp)
        # 3. noise (0–255 scale), then clip to [0, 1]
        noise = params.get("noise")
        if noise:
            nrng = np.random.default_rng(int(params["noise_seed"]))
            img = np.clip(img + _noise(img, noise, nrng), 0.0, 1.0)
        # 4. JPEG, quality q (OpenCV/libjpeg on BGR uint8, as BasicSR's add_jpg_compression)
        q = params.get("jpeg_quality")
        if q is not None:
            u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
            ok, buf = cv2.imencode(".jpg", rgb_to_bgr(u8), [int(cv2.IMWRITE_JPEG_QUALITY), int(q)])
            if not ok:  # pragma: no cover - libjpeg does not fail on valid uint8 input
                raise RuntimeError("OpenCV failed to JPEG-encode an image")
            img = bgr_to_rgb(cv2.imdecode(buf, cv2.IMREAD_COLOR)).astype(np.float32) * np.float32(1.0 / 255.0)
        # 5. up-sample back to the HQ size
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=interp)
        # 6. colour jitter and grayscale (LQ only, GFPGAN)
        shift = params.get("color_shift")
        if shift is not None:
            img = np.clip(img + np.asarray(shift, dtype=np.float32) / 255.0, 0.0, 1.0)
        if params.get("gray"):
            img = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    def __call__(self, hq: np.ndarray, seed: int | np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        """Degrade one image.

        Args:
            hq: ``(H, W, 3)`` uint8 RGB HQ image (not modified).
            seed: integer seed (normally :func:`image_seed`) or a NumPy generator.

        Returns:
            ``(lq, params)``: ``(H, W, 3)`` uint8 RGB LQ image of the same size, and the drawn
            parameters (see :meth:`sample_params`).
        """
        _check_hq(hq)
        params = self.sample_params(seed, hq.shape[0], hq.shape[1])
        return self.apply(hq, params), params


def _trim_kernel(kernel: np.ndarray, tol: float = 1e-7) -> np.ndarray:
    """Drop outer rings of a normalised kernel whose total weight is below ``tol``.

    Speed only: a 41-px kernel of a small σ is mostly zeros, and OpenCV filters kernels up to
    11 px directly (≈5× faster). The dropped weight (< 1e-7 of the range) never changes a uint8
    output level.
    """
    k = kernel
    while k.shape[0] > 1 and (k.sum() - k[1:-1, 1:-1].sum()) < tol:
        k = k[1:-1, 1:-1]
    return k


def _filter(img: np.ndarray, kernel: np.ndarray, separable: bool) -> np.ndarray:
    """Correlate ``(h, w, 3)`` float32 ``img`` with ``kernel`` (reflect-101 borders, as cv2.filter2D)."""
    if separable:
        # An isotropic Gaussian is exactly the outer product of its row and column sums.
        vec = kernel.sum(axis=1).astype(np.float32)
        return cv2.sepFilter2D(img, -1, vec, vec)
    return cv2.filter2D(img, -1, kernel.astype(np.float32))


def _check_hq(hq: np.ndarray) -> None:
    if not isinstance(hq, np.ndarray) or hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
        desc = f"{hq.dtype} {hq.shape}" if isinstance(hq, np.ndarray) else type(hq).__name__
        raise ValueError(f"Degrader expects an (H, W, 3) uint8 RGB array, got {desc}")
    if hq.shape[0] < 1 or hq.shape[1] < 1:
        raise ValueError(f"Degrader got an empty image {hq.shape}")


def _noise(img: np.ndarray, noise: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Additive noise field for ``img`` ((h, w, 3) float32 in [0, 1]), float32 same shape."""
    h, w, c = img.shape
    if noise["type"] == "gaussian":
        shape = (h, w, 1) if noise["gray"] else (h, w, c)
        n = rng.standard_normal(shape, dtype=np.float32) * np.float32(noise["sigma"] / 255.0)
        return np.broadcast_to(n, img.shape)
    if noise["type"] == "poisson":
        # BasicSR generate_poisson_noise: photon counts with 2^ceil(log2(#grey levels)) levels.
        src = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None] if noise["gray"] else img
        src = np.clip(np.rint(src * 255.0), 0, 255) / 255.0
        vals = 2 ** np.ceil(np.log2(max(len(np.unique(src)), 2)))
        n = (rng.poisson(src * vals) / vals - src).astype(np.float32) * np.float32(noise["scale"])
        return np.broadcast_to(n, img.shape)
    raise ValueError(f"unknown noise type {noise['type']!r}; choose from ['gaussian', 'poisson']")
