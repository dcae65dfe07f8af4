"""The metric layer: one interface, an explicit factory, the paper's metrics (docs/method.md §8).

Every metric is a :class:`Metric` with ``name``, ``full_reference``, ``lower_better`` and
``device``. Per-image metrics are called as ``metric(pred, gt)`` on ``(B, 3, H, W)`` RGB float
in [0, 1] and return ``(B,)`` float64 scores. Set-level metrics (``fid``) have
``set_level = True`` and are computed by :mod:`osdface.evaluation.folder` from features.

Conventions:

* ``psnr`` / ``ssim``: BasicSR ``calculate_psnr`` / ``calculate_ssim`` (DAEFR's script) on
  **RGB**, crop border 0, on the 8-bit images (inputs are rounded to uint8 first), data range 255,
  SSIM with an 11×11 Gaussian (σ = 1.5) window, valid region, averaged over channels.
  ``psnr_y`` / ``ssim_y``: the same on BT.601 luma (``Y = 16 + (65.481 R + 128.553 G + 24.966 B)/255``).
* ``lpips``: LPIPS v0.1 AlexNet (the lpips package default); ``lpips_vgg``: VGG16.
* ``dists``: DISTS (DISTS_pytorch = pyiqa).
* ``niqe``: :mod:`osdface.evaluation.niqe` (pyiqa conventions), no reference.
* ``fid``: pytorch-fid Inception; against the GT folder (FID(HQ)) or a statistics file (FID(FFHQ)).
* ``ids``: the paper's "Deg.": ArcFace ResNet-18 angle in degrees (VQFR protocol). Needs
  ``arcface_resnet18.pth``. ``ids_facenet``: the same angle with the offline FaceNet network —
  a different metric, reported under its own name.
* ``musiq``: MUSIQ-KonIQ (:mod:`.musiq`), pyiqa 0.1.12 ``musiq``; ``maniqa``: MANIQA-KonIQ
  (:mod:`.maniqa`, 20 fixed grid crops as pyiqa in eval mode); ``clipiqa``: CLIP-IQA with CLIP RN50
  and pyiqa's five antonym prompt pairs (:mod:`.clipiqa`); ``lmd``: mean distance in pixels between
  the 98 WFLW landmarks of pred and gt, AdaptiveWingLoss FAN-4HG, VQFR's protocol
  (:mod:`.landmarks`). Their weights are user files (none exist offline); a missing file is a
  :class:`~osdface.weights.WeightsNotFoundError` naming it and where to put it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidSettingError
from ..image import ImageError
from ..io.networks import (
    build_dists,
    build_fid_inception,
    build_identity_net,
    build_lpips,
    require_weight_file,
)
from ..utils.logging import get_logger
from .base import Metric

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# PSNR / SSIM (BasicSR conventions)
# ----------------------------------------------------------------------------------------------


def _to_uint8_float(x: torch.Tensor) -> np.ndarray:
    from ..image import to_uint8

    return to_uint8(x).astype(np.float64)  # (B, H, W, 3) on [0, 255]


def _luma(img: np.ndarray) -> np.ndarray:
    """BasicSR ``rgb2ycbcr(y_only=True)`` on [0, 255] → ``(B, H, W, 1)``."""
    return (img @ np.array([65.481, 128.553, 24.966]) / 255.0 + 16.0)[..., None]


def calculate_psnr(img: np.ndarray, img2: np.ndarray, crop_border: int = 0) -> float:
    """BasicSR PSNR of two ``(H, W, C)`` float arrays on [0, 255]; ``inf`` for identical images."""
    if crop_border:
        img, img2 = img[crop_border:-crop_border, crop_border:-crop_border], img2[crop_border:-crop_border,
                                                                                  crop_border:-crop_border]
    mse = np.mean((img - img2) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 * 255.0 / mse))


def _ssim_channel(img: np.ndarray, img2: np.ndarray) -> float:
    import cv2

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img, -1, window)[5:-5, 5:-5]  # valid region
    mu2 = cv2.filter2D(img2, -1, window)[5:-5, 5:-5]
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = cv2.filter2D(img**2, -1, window)[5:-5, 5:-5] - mu1_sq
    sigma2_sq = cv2.filter2D(img2**2, -1, window)[5:-5, 5:-5] - mu2_sq
    sigma12 = cv2.filter2D(img * img2, -1, window)[5:-5, 5:-5] - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return float(ssim_map.mean())


def calculate_ssim(img: np.ndarray, img2: np.ndarray, crop_border: int = 0) -> float:
    """BasicSR SSIM of two ``(H, W, C)`` float arrays on [0, 255] (mean over channels)."""
    if crop_border:
        img, img2 = img[crop_border:-crop_border, crop_border:-crop_border], img2[crop_border:-crop_border,
                                                                                  crop_border:-crop_border]
    if min(img.shape[:2]) < 11:
        raise ImageError(f"SSIM needs images of at least 11x11 pixels, got {img.shape[1]}x{img.shape[0]}")
    return float(np.mean([_ssim_channel(img[..., c], img2[..., c]) for c in range(img.shape[2])]))


class PSNR(Metric):
    name, full_reference, lower_better = "psnr", True, False

    def __init__(self, device="cpu", y_channel: bool = False, crop_border: int = 0, **_):
        super().__init__(device)
        self.y_channel, self.crop_border = y_channel, crop_border
        self.name = "psnr_y" if y_channel else "psnr"

    def compute(self, pred, gt):
        a, b = _to_uint8_float(pred), _to_uint8_float(gt)
        if self.y_channel:
            a, b = _luma(a), _luma(b)
        return [calculate_psnr(x, y, self.crop_border) for x, y in zip(a, b)]


class SSIM(PSNR):
    name = "ssim"

    def __init__(self, device="cpu", y_channel: bool = False, crop_border: int = 0, **_):
        super().__init__(device, y_channel, crop_border)
        self.name = "ssim_y" if y_channel else "ssim"

    def compute(self, pred, gt):
        a, b = _to_uint8_float(pred), _to_uint8_float(gt)
        if self.y_channel:
            a, b = _luma(a), _luma(b)
        return [calculate_ssim(x, y, self.crop_border) for x, y in zip(a, b)]


# ----------------------------------------------------------------------------------------------
# Deep full-reference metrics
# ----------------------------------------------------------------------------------------------


class LPIPSMetric(Metric):
    full_reference, lower_better = True, True

    def __init__(self, device="cpu", net: str = "alex", weights_dir=None, pretrained: bool = True, **_):
        super().__init__(device)
        self.name = "lpips" if net == "alex" else f"lpips_{net}"
        self.net = build_lpips(net, weights_dir=weights_dir, pretrained=pretrained).to(self.device)

    def compute(self, pred, gt):
        return self.net(pred.to(self.device), gt.to(self.device), normalize=True).reshape(-1)


class DISTSMetric(Metric):
    name, full_reference, lower_better = "dists", True, True

    def __init__(self, device="cpu", weights_dir=None, pretrained: bool = True, **_):
        super().__init__(device)
        self.net = build_dists(weights_dir=weights_dir, pretrained=pretrained).to(self.device)

    def compute(self, pred, gt):
        # DISTS_pytorch.DISTS.forward(ref, dist)
        return self.net(gt.to(self.device), pred.to(self.device)).reshape(-1)


class NIQEMetric(Metric):
    name, full_reference, lower_better = "niqe", False, True

    def __init__(self, device="cpu", weights_dir=None, crop_border: int = 0, **_):
        super().__init__(device)
        from .niqe import load_niqe_params

        self.params = str(require_weight_file("niqe", weights_dir))
        load_niqe_params(self.params)  # a malformed file fails here, before any image is read (cached)
        self.crop_border = crop_border

    def compute(self, pred, gt=None):
        from ..image import to_uint8
        from .niqe import calculate_niqe

        return [calculate_niqe(a, self.params, self.crop_border) for a in to_uint8(pred)]


class FIDMetric(Metric):
    """Set-level FID. ``features(images)`` → ``(N, 2048)``; ``distance(feats_a, feats_b | stats)``."""

    name, full_reference, lower_better, set_level = "fid", True, True, True

    def __init__(self, device="cpu", weights_dir=None, pretrained: bool = True, batch_size: int = 16, **_):
        super().__init__(device)
        from ..io.networks import find_weight_file

        self.model = build_fid_inception(weights_dir=weights_dir, pretrained=pretrained).to(self.device)
        path = find_weight_file("fid_inception", weights_dir) if pretrained else None
        self.weights_id = f"{path.name}:{path.stat().st_size}" if path else "random"
        self.batch_size = batch_size

    def features(self, images) -> np.ndarray:
        from .fid import extract_features

        return extract_features(images, self.model, self.batch_size)

    def distance(self, pred_feats: np.ndarray, ref) -> float:
        """FID between features and reference features ``(M, 2048)`` or ``(mu, sigma)`` statistics."""
        from .fid import frechet_distance, statistics

        mu1, s1 = statistics(pred_feats)
        mu2, s2 = ref if isinstance(ref, tuple) else statistics(ref)
        return frechet_distance(mu1, s1, mu2, s2)

    def compute(self, pred, gt):
        raise TypeError("fid is a set-level metric: use features()/distance() or evaluate_folder")


# ----------------------------------------------------------------------------------------------
# Identity (face) metrics
# ----------------------------------------------------------------------------------------------

#: Face box (x0, y0, x1, y1) as fractions of an FFHQ-aligned crop, for FaceNet (≈ MTCNN box + margin).
FFHQ_FACENET_BOX = (0.1875, 0.25, 0.8125, 0.875)
#: identity backend → metric name
IDENTITY_METRIC_NAMES = {"arcface": "ids", "facenet": "ids_facenet"}


class IdentityMetric(Metric):
    """Identity distance: angle between embeddings of pred and gt, in degrees (docs/method.md §8 "Deg.").

    Args:
        backend: ``"arcface"`` (the paper's; ResNet-18, gray 128×128 via OpenCV, embedding of the
            image and its mirror concatenated, as VQFR's ``calculate_cos_dist.py``) or
            ``"facenet"`` (offline FaceNet, 160×160 RGB of ``crop`` region).
        crop: face box as fractions (x0, y0, x1, y1) for FaceNet; ``None`` = whole image.
        min_angle: pairs below this angle (degrees) are left out of the mean (VQFR excludes < 1°);
            see :meth:`aggregate`.
    """

    full_reference, lower_better = True, True

    def __init__(self, device="cpu", backend: str = "arcface", weights_dir=None, pretrained: bool = True,
                 crop=FFHQ_FACENET_BOX, min_angle: float = 1.0, **_):
        super().__init__(device)
        if backend not in IDENTITY_METRIC_NAMES:
            raise InvalidSettingError(f"unknown identity backend {backend!r}; "
                                      f"choose from {list(IDENTITY_METRIC_NAMES)}")
        self.backend, self.crop, self.min_angle = backend, crop, min_angle
        self.name = IDENTITY_METRIC_NAMES[backend]
        self.net = build_identity_net(backend, weights_dir=weights_dir, pretrained=pretrained)
        self.net.eval().to(self.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] → unit-norm embeddings ``(B, D)``."""
        from ..models.identity import facenet_preprocess

        if self.backend == "arcface":
            import cv2

            from ..image import to_uint8

            grays = []
            for a in to_uint8(x):
                g = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)  # = cv2.imread(path, 0) of the saved file
                g = cv2.resize(g, (128, 128), interpolation=cv2.INTER_LINEAR)
                grays.append(np.stack([g, np.fliplr(g)]))
            t = torch.from_numpy(np.stack(grays).astype(np.float32)).reshape(-1, 1, 128, 128)
            t = (t - 127.5) / 127.5
            f = self.net(t.to(self.device)).reshape(x.shape[0], -1)  # (B, 1024): image ⊕ mirror
        else:
            if self.crop is not None:
                h, w = x.shape[-2:]
                x0, y0, x1, y1 = self.crop
                x = x[..., round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)]
            f = self.net(facenet_preprocess(x.to(self.device)))
        return torch.nn.functional.normalize(f.double(), dim=1)

    def compute(self, pred, gt):
        cos = (self.embed(pred) * self.embed(gt)).sum(1).clamp(-1, 1)
        return torch.rad2deg(torch.arccos(cos))

    def aggregate(self, values: list[float]) -> float:
        """Mean angle over pairs ≥ ``min_angle`` (VQFR: near-identical pairs are not counted)."""
        kept = [v for v in values if v >= self.min_angle and math.isfinite(v)]
        return float(np.mean(kept)) if kept else float("nan")


# ----------------------------------------------------------------------------------------------
# Networks ported in their own modules (imported when the metric is built: open_clip and timm
# are slow to import and only these metrics need them)
# ----------------------------------------------------------------------------------------------


def _musiq(**kw) -> Metric:
    from .musiq import MUSIQMetric

    return MUSIQMetric(**kw)


def _maniqa(**kw) -> Metric:
    from .maniqa import MANIQAMetric

    return MANIQAMetric(**kw)


def _clipiqa(**kw) -> Metric:
    from .clipiqa import CLIPIQAMetric

    return CLIPIQAMetric(**kw)


def _lmd(**kw) -> Metric:
    from .landmarks import LMDMetric

    return LMDMetric(**kw)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """Registry entry: factory + static properties (readable without building the metric)."""

    factory: Callable[..., Metric]
    full_reference: bool
    lower_better: bool
    description: str
    set_level: bool = False


METRICS: dict[str, MetricInfo] = {
    "psnr": MetricInfo(lambda **kw: PSNR(**kw), True, False, "PSNR, BasicSR, RGB, crop 0, 8-bit"),
    "ssim": MetricInfo(lambda **kw: SSIM(**kw), True, False, "SSIM, BasicSR, RGB, crop 0, 8-bit"),
    "psnr_y": MetricInfo(lambda **kw: PSNR(y_channel=True, **kw), True, False, "PSNR on BT.601 Y (BasicSR)"),
    "ssim_y": MetricInfo(lambda **kw: SSIM(y_channel=True, **kw), True, False, "SSIM on BT.601 Y (BasicSR)"),
    "lpips": MetricInfo(lambda **kw: LPIPSMetric(net="alex", **kw), True, True, "LPIPS v0.1 AlexNet"),
    "lpips_vgg": MetricInfo(lambda **kw: LPIPSMetric(net="vgg", **kw), True, True, "LPIPS v0.1 VGG16"),
    "dists": MetricInfo(lambda **kw: DISTSMetric(**kw), True, True, "DISTS"),
    "niqe": MetricInfo(lambda **kw: NIQEMetric(**kw), False, True, "NIQE (pyiqa conventions)"),
    "fid": MetricInfo(lambda **kw: FIDMetric(**kw), True, True, "FID (pytorch-fid Inception) vs GT set or stats",
                      set_level=True),
    "musiq": MetricInfo(_musiq, False, False, "MUSIQ-KonIQ (pyiqa 0.1.12 musiq), about 0-100"),
    "maniqa": MetricInfo(_maniqa, False, False, "MANIQA-KonIQ (pyiqa 0.1.12 maniqa: 20 grid crops)"),
    "clipiqa": MetricInfo(_clipiqa, False, False, "CLIP-IQA (pyiqa 0.1.12 clipiqa: RN50, 5 antonym prompt pairs)"),
    "ids": MetricInfo(lambda **kw: IdentityMetric(backend="arcface", **kw), True, True,
                      "Deg.: ArcFace ResNet-18 identity angle (degrees)"),
    "ids_facenet": MetricInfo(lambda **kw: IdentityMetric(backend="facenet", **kw), True, True,
                              "identity angle (degrees) with offline FaceNet; NOT the paper's Deg."),
    "lmd": MetricInfo(_lmd, True, True, "LMD: FAN-4HG WFLW 98-landmark distance in pixels (VQFR protocol)"),
}


def list_metrics() -> list[str]:
    """Registered metric names."""
    return list(METRICS)


def metric_info(name: str) -> MetricInfo:
    """Static properties of a metric; raises ``KeyError`` listing the valid names."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; choose from {list_metrics()}")
    return METRICS[name]


def create_metric(name: str, device: str | torch.device = "cpu", weights_dir: str | os.PathLike | None = None,
                  **kwargs) -> Metric:
    """Build metric ``name`` on ``device`` with weights from ``weights_dir`` (default ``$OSDFACE_HOME/metrics``).

    Raises:
        KeyError: unknown name (the message lists the valid ones).
        WeightsNotFoundError: a weight file is missing (the message names it and where to put it).
    """
    return metric_info(name).factory(device=device, weights_dir=weights_dir, **kwargs)
