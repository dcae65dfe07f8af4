"""FID: pytorch-fid's Inception (pool3, 2048-d) features, statistics, cache and Fréchet distance.

Features follow pytorch-fid / BasicSR (the paper's FID, docs/method.md §8): RGB in [0, 1] → bilinear
resize to 299×299 → [-1, 1] → FID Inception-v3 (TF 2015-12-05 weights) → pool3. The distance is
``pytorch_fid.fid_score.calculate_frechet_distance``. Per-folder features are cached (keyed by
the resolved folder, the file names, their sizes and modification times and the weight file),
by default under ``$OSDFACE_HOME/cache/fid``; the input folders are never written to.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidSettingError, ModelFileError, WeightsNotFoundError, first_line
from ..utils.logging import get_logger

logger = get_logger(__name__)


def default_cache_dir() -> Path:
    from ..weights import osdface_home

    return osdface_home() / "cache" / "fid"


def _cache_key(files: Sequence[Path], weights_id: str) -> str:
    h = hashlib.sha256()
    h.update(weights_id.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def extract_features(
    images: torch.Tensor | Sequence[torch.Tensor], model: torch.nn.Module, batch_size: int = 16
) -> np.ndarray:
    """``(N, 3, H, W)`` tensor or list of ``(1|3, H, W)``/``(1, 3, H, W)`` tensors in [0, 1] → ``(N, 2048)`` float64."""
    device = next(model.parameters()).device
    items = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0))
    feats = []
    for i in range(0, len(items), batch_size):
        chunk = []
        for t in items[i:i + batch_size]:
            t = t if t.ndim == 4 else t.unsqueeze(0)
            # resizing each image first is what the model does itself (bilinear, align_corners=False);
            # it lets images of different sizes share a batch without changing the numbers.
            chunk.append(F.interpolate(t.float(), size=(299, 299), mode="bilinear", align_corners=False))
        x = torch.cat(chunk).to(device)
        feats.append(model(x)[0].flatten(1).double().cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 2048))


def folder_features(
    files: Sequence[Path],
    model: torch.nn.Module,
    weights_id: str,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Features of image files, cached per file list (names + sizes + mtimes)."""
    from tqdm.auto import tqdm

    from ..image import read_image, to_tensor
    from ..utils.io import atomic_path

    files = [Path(f) for f in files]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(files, weights_id)
    path = cache / f"{key}.npy"
    if use_cache and path.is_file():
        feats = np.load(path, allow_pickle=False)
        if feats.shape == (len(files), 2048):
            logger.info("FID features from cache %s", path)
            return feats
    feats = []
    bar = tqdm(total=len(files), desc="FID features", unit="img", disable=not progress)
    for i in range(0, len(files), batch_size):
        batch = [to_tensor(read_image(f).rgb) for f in files[i:i + batch_size]]
        feats.append(extract_features(batch, model, batch_size))
        bar.update(len(batch))
    bar.close()
    out = np.concatenate(feats) if feats else np.zeros((0, 2048))
    if use_cache:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, out, allow_pickle=False)
        with atomic_path(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps({"files": [str(f) for f in files], "weights": weights_id}))
    return out


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (2048,), sigma (2048, 2048))`` of ``(N, 2048)`` features (N ≥ 2)."""
    if feats.shape[0] < 2:
        raise InvalidSettingError(f"FID needs at least 2 images per set, got {feats.shape[0]}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh") -> float:
    """Fréchet distance ``|mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)`` between two Gaussians.

    ``method="sqrtm"`` is pytorch-fid's ``calculate_frechet_distance`` (SciPy ``sqrtm`` of the
    2048×2048 product; ~10–50 s on a CPU). ``"eigh"`` (default) computes the same trace as the sum
    of square roots of the eigenvalues of the symmetric PSD matrix ``S1^½ S2 S1^½`` (two symmetric
    eigendecompositions, a few seconds); the two agree to ~1e-6 relative (tested).
    """
    if method == "sqrtm":
        from pytorch_fid.fid_score import calculate_frechet_distance

        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    if method != "eigh":
        raise InvalidSettingError(f"unknown Fréchet method {method!r}; choose from ['eigh', 'sqrtm']")
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise InvalidSettingError(f"mean/covariance shapes differ: {mu1.shape} vs {mu2.shape}, {s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^½ (PSD)
    m = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics: pytorch-fid ``.npz`` (``mu``, ``sigma``) or BasicSR's ``inception_*.pth``
    (``{'mean', 'cov'}``, e.g. ``inception_FFHQ_512.pth`` for FID(FFHQ)), read without running code.

    BasicSR's files pickle numpy arrays, which ``torch.load(weights_only=True)`` refuses: those are
    read with :func:`osdface.safe_load.load_numpy_pickle` (numpy arrays and dicts only).

    Raises:
        WeightsNotFoundError: no such file (a ``FileNotFoundError``).
        ModelFileError: not a statistics file of either kind, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: FID statistics file not found (FID(FFHQ) uses BasicSR's inception_FFHQ_512.pth, "
            "from the BasicSR/VQFR/CodeFormer release assets)"
        )
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise ModelFileError(f"{path}: expected arrays 'mu' and 'sigma'")
            return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    from ..safe_load import load_numpy_pickle

    data = None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's weights-only reader refuses numpy arrays: BasicSR's layout
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as zf:
                    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
                    if pkl:
                        data = load_numpy_pickle(zf.read(pkl[0]), str(path))
            else:
                data = load_numpy_pickle(path.read_bytes(), str(path))
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelFileError(f"{path}: not a readable FID statistics file ({e})") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a corrupt or truncated torch file
        raise ModelFileError(f"{path}: not a readable FID statistics file ({first_line(e)})") from e
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a dict with 'mean'/'cov' or 'mu'/'sigma'")
    mu = data.get("mean", data.get("mu"))
    sigma = data.get("cov", data.get("sigma"))
    if mu is None or sigma is None:
        raise ModelFileError(f"{path}: expected keys 'mean'/'cov' or 'mu'/'sigma', got {sorted(data)}")
    def to_np(a):
        return a.double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)

    return to_np(mu), to_np(sigma)
