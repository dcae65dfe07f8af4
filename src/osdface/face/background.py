"""Background upsamplers for ``--upscale``: an interpolator, or a Real-ESRGAN model the user supplies.

An upsampler is a callable ``up(rgb, scale) -> rgb`` on ``(H, W, 3)`` uint8 RGB arrays returning
``(round(H·scale), round(W·scale), 3)`` uint8. Choose one by name with
:func:`create_bg_upsampler`: ``lanczos`` (default), ``bicubic``, ``bilinear``, ``area``,
``nearest``, or a path to an RRDBNet ``.pth`` (Real-ESRGAN ``RealESRGAN_x2plus.pth`` /
``RealESRGAN_x4plus.pth``, loaded with ``weights_only``), which runs tiled so memory stays bounded.

RRDBNet is from Wang et al., "ESRGAN" (ECCV 2018 workshops) and "Real-ESRGAN" (ICCVW 2021),
xinntao/Real-ESRGAN and BasicSR (BSD-3-Clause / Apache-2.0); re-written with the same parameter
names so the released state dicts (``params_ema``) load with ``strict=True``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidSettingError, WeightsNotFoundError
from ..utils.logging import get_logger

logger = get_logger(__name__)

INTERPOLATIONS = {
    "lanczos": cv2.INTER_LANCZOS4,
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
}


def output_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """``(round(h·scale), round(w·scale))``, at least 1."""
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class ResizeUpsampler:
    """Plain interpolation (OpenCV). ``name`` is a key of :data:`INTERPOLATIONS`."""

    def __init__(self, name: str = "lanczos") -> None:
        if name not in INTERPOLATIONS:
            raise InvalidSettingError(f"unknown interpolation {name!r}; choose from {list(INTERPOLATIONS)}")
        self.name = name

    def __call__(self, rgb: np.ndarray, scale: float) -> np.ndarray:
        h, w = rgb.shape[:2]
        oh, ow = output_size(h, w, scale)
        if (oh, ow) == (h, w):
            return rgb.copy()
        flag = INTERPOLATIONS[self.name]
        if scale < 1 and self.name == "lanczos":
            flag = cv2.INTER_AREA
        return cv2.resize(rgb, (ow, oh), interpolation=flag)


class _RDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = _RDB(nf, gc), _RDB(nf, gc), _RDB(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """RRDBNet (×1, ×2 or ×4): ``(B, 3, H, W)`` RGB in [0, 1] → ``(B, 3, H·scale, W·scale)``.

    For ×2 / ×1 the input is pixel-unshuffled first (Real-ESRGAN's x2plus layout).
    """

    def __init__(self, scale: int = 4, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32) -> None:
        super().__init__()
        if scale not in (1, 2, 4):
            raise InvalidSettingError(f"RRDBNet scale must be 1, 2 or 4, got {scale}")
        self.scale = scale
        unshuffle = {4: 1, 2: 2, 1: 4}[scale]
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(num_in_ch * unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[_RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)  # (B, 3·u², H/u, W/u)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def load_rrdbnet(path: str | os.PathLike, scale: int | None = None) -> RRDBNet:
    """Load a Real-ESRGAN RRDBNet ``.pth`` (``params_ema`` / ``params`` / plain), ``weights_only``.

    The scale comes from ``conv_first``'s input channels (3 → ×4, 12 → ×2, 48 → ×1) and the
    block count from the keys, unless given.
    """
    from ..errors import ModelFileError, WeightsNotFoundError
    from ..io.state_dicts import load_checked, unwrap_state_dict
    from ..safe_load import load_safetensors, load_torch_checkpoint

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"background upsampler weights not found: {path} (e.g. Real-ESRGAN's RealESRGAN_x2plus.pth); "
            "osdface never downloads"
        )
    raw = load_safetensors(path, "Real-ESRGAN") if path.suffix == ".safetensors" else load_torch_checkpoint(path)
    sd = unwrap_state_dict(raw, path)
    if "conv_first.weight" not in sd or not any(k.startswith("body.") for k in sd):
        raise ModelFileError(f"{path}: not an RRDBNet (Real-ESRGAN) state dict (no conv_first.weight / body.*)")
    in_ch = sd["conv_first.weight"].shape[1]
    if scale is None:
        scale = {3: 4, 12: 2, 48: 1}.get(in_ch)
        if scale is None:
            raise ModelFileError(f"{path}: cannot infer the scale from conv_first with {in_ch} input channels")
    num_block = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
    net = RRDBNet(scale=scale, num_feat=sd["conv_first.weight"].shape[0], num_block=num_block,
                  num_grow_ch=sd["body.0.rdb1.conv1.weight"].shape[0])
    return load_checked(net, sd, path, "RRDBNet weights of the inferred size").eval()


class ModelUpsampler:
    """Tiled super-resolution with an :class:`RRDBNet`; resized afterwards to the requested scale.

    Args:
        net: the network (its ``scale`` is the native factor).
        tile: tile side in input pixels (0 = whole image at once).
        tile_pad: context added around each tile and cropped away after.
        fallback: interpolation for the final resize to the requested scale.
    """

    def __init__(self, net: RRDBNet, tile: int = 400, tile_pad: int = 10, fallback: str = "lanczos") -> None:
        self.net = net.eval()
        self.tile, self.tile_pad = int(tile), int(tile_pad)
        self.resize = ResizeUpsampler(fallback)
        self.name = f"rrdbnet_x{net.scale}"

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | None = None, **kw) -> ModelUpsampler:
        return cls(load_rrdbnet(path).to(torch.device(device or "cpu")), **kw)

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        s = self.net.scale
        _, _, h, w = x.shape
        # pad so pixel-unshuffle divides evenly
        m = self.net.unshuffle
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        if not self.tile or max(h, w) <= self.tile:
            return self.net(x)[..., : h * s, : w * s]
        out = x.new_zeros(x.shape[0], 3, h * s, w * s)
        t, p = self.tile, self.tile_pad
        for ty in range(math.ceil(h / t)):
            for tx in range(math.ceil(w / t)):
                y0, x0 = ty * t, tx * t
                y1, x1 = min(y0 + t, h), min(x0 + t, w)
                py0, px0 = max(y0 - p, 0), max(x0 - p, 0)
                py1, px1 = min(y1 + p, h), min(x1 + p, w)
                # keep tile corners on the unshuffle grid
                py0, px0 = py0 - py0 % m, px0 - px0 % m
                py1, px1 = min(py1 + (-py1) % m, x.shape[2]), min(px1 + (-px1) % m, x.shape[3])
                o = self.net(x[:, :, py0:py1, px0:px1])
                out[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = o[:, :, (y0 - py0) * s:(y1 - py0) * s,
                                                            (x0 - px0) * s:(x1 - px0) * s]
        return out

    def __call__(self, rgb: np.ndarray, scale: float) -> np.ndarray:
        h, w = rgb.shape[:2]
        p = next(self.net.parameters())
        x = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1)[None].to(p.device, p.dtype) / 255.0
        y = self._run(x).clamp(0, 1)
        out = (y[0].permute(1, 2, 0).float().cpu().numpy() * 255.0).round().astype(np.uint8)
        oh, ow = output_size(h, w, scale)
        if out.shape[:2] != (oh, ow):
            flag = cv2.INTER_AREA if ow < out.shape[1] else INTERPOLATIONS[self.resize.name]
            out = cv2.resize(out, (ow, oh), interpolation=flag)
        return out


#: Real-ESRGAN files ``--bg-upsampler realesrgan`` looks for in ``$OSDFACE_HOME/face/``, in order
REALESRGAN_FILES = ("RealESRGAN_x2plus.pth", "RealESRGAN_x4plus.pth")


def find_realesrgan_model() -> Path:
    """The first of :data:`REALESRGAN_FILES` in ``$OSDFACE_HOME/face/`` (as the detector and parser files).

    Raises:
        WeightsNotFoundError: none there; the message names the files, the folder and the source.
    """
    from .detection import face_weights_dir

    for name in REALESRGAN_FILES:
        path = face_weights_dir() / name
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        f"--bg-upsampler realesrgan: none of {', '.join(REALESRGAN_FILES)} in {face_weights_dir()}/. "
        "Put RealESRGAN_x2plus.pth (67 MB) from the Real-ESRGAN v0.2.1 release "
        "(https://github.com/xinntao/Real-ESRGAN/releases) there, give the .pth path instead, or use lanczos."
    )


def create_bg_upsampler(spec: str | None = "lanczos", device: str | None = None, tile: int = 400):
    """``spec``: an interpolation name (:data:`INTERPOLATIONS`), ``"realesrgan"`` (the file in
    ``$OSDFACE_HOME/face/``, :func:`find_realesrgan_model`) or a path to an RRDBNet ``.pth``."""
    if spec is None or spec in INTERPOLATIONS:
        return ResizeUpsampler(spec or "lanczos")
    if spec == "realesrgan":
        return ModelUpsampler.from_file(find_realesrgan_model(), device=device, tile=tile)
    if spec.endswith((".pth", ".pt", ".safetensors")) or os.sep in spec or Path(spec).expanduser().exists():
        return ModelUpsampler.from_file(spec, device=device, tile=tile)
    raise InvalidSettingError(f"unknown background upsampler {spec!r}; choose from {list(INTERPOLATIONS)}, "
                              "realesrgan, or give a .pth file")
