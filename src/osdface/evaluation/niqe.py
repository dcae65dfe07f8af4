"""NIQE (Mittal et al., "Making a completely blind image quality analyzer", 2013).

An independent NumPy implementation of the MATLAB reference algorithm, with the conventions of
pyiqa's ``niqe`` (the implementation the paper's numbers come from, docs/method.md §8):

* luminance ``Y = round(255 · (0.299 R + 0.587 G + 0.114 B))`` (MATLAB ``rgb2gray``; pyiqa's
  ``color_space='yiq'``), computed in float32 as pyiqa does, then float64 throughout;
* image cropped to whole 96×96 blocks; two scales, the second from MATLAB-style bicubic
  ``imresize(·, 0.5)`` with antialiasing;
* MSCN normalisation with the 7×7 Gaussian window (σ = 7/6, held in float32 like pyiqa's
  ``fspecial``), replicate borders, ``C = 1``, filtered with float64 ``torch`` convolutions — flat
  image regions make NIQE depend on the rounding noise of this filter, so the filter must be
  computed the same way as the reference to reproduce its values;
* 18 AGGD features per block and scale (circular shifts, as MATLAB's ``circshift``);
* distance ``sqrt((μp − μd)ᵀ pinv((Σp + Σd)/2) (μp − μd))`` with the pristine model
  ``niqe_pris_params.npz`` (basicsr's copy of the MATLAB ``modelparameters.mat``).

Pure NumPy/SciPy, no network: the structure follows BasicSR's ``basicsr/metrics/niqe.py``
(Apache-2.0), the colour conversion follows pyiqa's default. Lower is better.
"""

from __future__ import annotations

import math
import os
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from ..image import ImageError

_GAMMA = np.arange(0.2, 10.001, 0.001)
_R_GAMMA = None


def _r_gamma() -> np.ndarray:
    global _R_GAMMA
    if _R_GAMMA is None:
        from scipy.special import gammaln

        _R_GAMMA = np.exp(2 * gammaln(2.0 / _GAMMA) - (gammaln(1.0 / _GAMMA) + gammaln(3.0 / _GAMMA)))
    return _R_GAMMA


def estimate_aggd_param(block: np.ndarray) -> tuple[float, float, float]:
    """AGGD parameters ``(alpha, beta_l, beta_r)`` of a 2-D array (moment matching on a γ grid)."""
    from scipy.special import gammaln

    block = block.ravel()
    left = block[block < 0]
    right = block[block > 0]
    left_std = np.sqrt(np.mean(left**2)) if left.size else np.nan
    right_std = np.sqrt(np.mean(right**2)) if right.size else np.nan
    gammahat = left_std / right_std
    rhat = (np.mean(np.abs(block))) ** 2 / np.mean(block**2)
    rhatnorm = (rhat * (gammahat**3 + 1) * (gammahat + 1)) / ((gammahat**2 + 1) ** 2)
    # A NaN moment ratio (empty side, flat block) selects the first grid value, as torch.argmin
    # does in pyiqa; the NaN betas then drop the block from the covariance.
    alpha = _GAMMA[0] if np.isnan(rhatnorm) else _GAMMA[np.argmin(np.abs(_r_gamma() - rhatnorm))]
    scale = np.sqrt(np.exp(gammaln(1 / alpha) - gammaln(3 / alpha)))
    return float(alpha), float(left_std * scale), float(right_std * scale)


def compute_feature(block: np.ndarray) -> list[float]:
    """The 18 NIQE features of one MSCN block."""
    from scipy.special import gammaln

    alpha, beta_l, beta_r = estimate_aggd_param(block)
    feat = [alpha, (beta_l + beta_r) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        shifted = np.roll(block, shift, axis=(0, 1))
        alpha, beta_l, beta_r = estimate_aggd_param(block * shifted)
        mean = (beta_r - beta_l) * np.exp(gammaln(2 / alpha) - gammaln(1 / alpha))
        feat.extend((alpha, mean, beta_l, beta_r))
    return feat


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


def _resize_weights(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB ``imresize`` contributions (bicubic, antialiasing when shrinking)."""
    kernel_width = 4.0
    antialias = scale < 1
    if antialias:
        kernel_width /= scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    p = int(math.ceil(kernel_width) + 2)
    idx = left[:, None] + np.arange(p)[None, :]  # (out, p), 1-based
    dist = u[:, None] - idx
    w = scale * _cubic(dist * scale) if antialias else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    # MATLAB's symmetric boundary handling: mirror the 1-based indices into [1, in_len]
    aux = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx = aux[np.mod(idx.astype(np.int64) - 1, aux.size)]
    keep = np.any(w != 0, axis=0)
    return w[:, keep], idx[:, keep]


def imresize_half(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize(img, 0.5)`` (bicubic, antialiased) of a 2-D float64 array."""
    h, w = img.shape
    out_h, out_w = math.ceil(h * 0.5), math.ceil(w * 0.5)
    wh, ih = _resize_weights(h, out_h, 0.5)
    out = np.einsum("op,opw->ow", wh, img[ih])  # (out_h, w)
    ww, iw = _resize_weights(w, out_w, 0.5)
    return np.einsum("op,hop->ho", ww, out[:, iw])  # (out_h, out_w)


#: array → the shapes accepted in ``niqe_pris_params.npz`` (BasicSR / pyiqa store ``mu`` as ``(1, 36)``)
NIQE_PARAM_SHAPES = {"mu_pris_param": ((1, 36), (36,)), "cov_pris_param": ((36, 36),), "gaussian_window": ((7, 7),)}


def _checked_member(zf: zipfile.ZipFile, path: str, key: str) -> np.ndarray:
    """Array ``key`` of the ``.npz`` archive, its header (shape, dtype) checked before any data is read."""
    from numpy.lib import format as npformat

    name = f"{key}.npy"
    if name not in zf.namelist():
        raise ModelFileError(f"{path}: not a NIQE parameter file (no array {key!r})")
    with zf.open(name) as f:
        version = npformat.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ModelFileError(f"{path}: not a NIQE parameter file ({key!r}: .npy format {version})")
        read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, _fortran, dtype = read_header(f)
        if shape not in NIQE_PARAM_SHAPES[key] or dtype.kind != "f" or dtype.hasobject:
            raise ModelFileError(f"{path}: not a NIQE parameter file ({key!r} is {dtype} {shape}, expected float "
                                 f"{' or '.join(str(s) for s in NIQE_PARAM_SHAPES[key])})")
    with zf.open(name) as f:
        return npformat.read_array(f, allow_pickle=False)


@lru_cache(maxsize=4)
def load_niqe_params(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu (36,), cov (36, 36), gaussian_window (7, 7))`` from ``niqe_pris_params.npz``.

    Each array's header is checked (shape, float dtype) before its data is read, so a file that
    claims a huge array is refused without allocating it.

    Raises:
        ModelFileError: not a NIQE parameter file (not an ``.npz``, missing or wrongly shaped
            arrays), naming ``path``.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            mu = np.ravel(_checked_member(zf, path, "mu_pris_param")).astype(np.float64)
            cov = np.asarray(_checked_member(zf, path, "cov_pris_param"), dtype=np.float64)
            window = np.asarray(_checked_member(zf, path, "gaussian_window"), dtype=np.float64)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{path}: not a NIQE parameter file ({e})") from None
    return mu, cov, window


def rgb_to_niqe_y(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB → ``(H, W)`` float64 luminance on [0, 255], rounded (pyiqa ``yiq``)."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    y = (x @ weights) * np.float32(255.0)
    return np.round(y).astype(np.float64)


def niqe_from_y(y: np.ndarray, mu_pris: np.ndarray, cov_pris: np.ndarray, window: np.ndarray,
                block_size: int = 96) -> float:
    """NIQE of a 2-D luminance array on [0, 255]. Images smaller than one block raise ``ValueError``."""
    import torch
    import torch.nn.functional as F

    kernel = torch.from_numpy(window).float().double()[None, None]  # (1, 1, 7, 7)
    pad = window.shape[0] // 2

    def correlate(img: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="replicate"), kernel)[0, 0].numpy()

    h, w = y.shape
    nbh, nbw = h // block_size, w // block_size
    if nbh == 0 or nbw == 0:
        raise ImageError(f"NIQE needs an image of at least {block_size}x{block_size} pixels, got {w}x{h}")
    img = y[: nbh * block_size, : nbw * block_size]
    feats = []
    for scale in (1, 2):
        mu = correlate(img)
        sigma = np.sqrt(np.abs(correlate(img * img) - mu * mu))
        mscn = (img - mu) / (sigma + 1)
        bs = block_size // scale
        feats.append(np.array([compute_feature(mscn[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs])
                               for j in range(nbw) for i in range(nbh)], dtype=np.float64))
        if scale == 1:
            img = imresize_half(img / 255.0) * 255.0
    dist = np.concatenate(feats, axis=1)  # (blocks, 36)
    mu_dist = np.nanmean(dist, axis=0)
    clean = dist[~np.isnan(dist).any(axis=1)]
    cov_dist = np.cov(clean, rowvar=False)
    inv = np.linalg.pinv((cov_pris + cov_dist) / 2)
    diff = mu_pris - mu_dist
    return float(np.sqrt(diff @ inv @ diff))


def calculate_niqe(rgb: np.ndarray, params_path: str | os.PathLike, crop_border: int = 0) -> float:
    """NIQE of an ``(H, W, 3)`` uint8 RGB image (lower is better)."""
    mu, cov, window = load_niqe_params(str(Path(params_path)))
    y = rgb_to_niqe_y(rgb)
    if crop_border:
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    return niqe_from_y(y, mu, cov, window)
