"""Optional face-parsing masks for paste-back (keeps hair, background and neck out of the paste).

The network is ParseNet from Chen et al., "Progressive Semantic-Aware Style Transformation for
Blind Face Restoration" (PSFR-GAN, CVPR 2021, chaofengc/PSFRGAN), as packaged by xinntao/facexlib
(MIT) in ``parsing_parsenet.pth`` and used by GFPGAN/CodeFormer for paste-back. Re-written here
with the same parameter names so that file loads with ``strict=True`` (``weights_only``); it is
never downloaded: the user supplies it (``--parsing-model FILE``).

Classes (CelebAMask-HQ, 19): 0 background, 1 skin, 2 nose, 3 eyeglasses, 4/5 eyes, 6/7 brows,
8/9 ears, 10 mouth, 11/12 lips, 13 hair, 14 hat, 15 earring, 16 necklace, 17 neck, 18 cloth.
The paste mask keeps the face classes (1–13, 15) like CodeFormer's ``MASK_COLORMAP``.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Classes pasted from the restored face (1) or kept from the background (0).
FACE_CLASSES = (0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0)
PARSENET_FILE = "parsing_parsenet.pth"


class _Conv(nn.Module):
    """[upsample ×2] → reflection pad → conv (stride 2 when down) → [BN] → [LeakyReLU 0.2]."""

    def __init__(self, cin: int, cout: int, scale: str = "none", norm: bool = False, act: bool = False) -> None:
        super().__init__()
        self.scale = scale
        self.conv2d = nn.Conv2d(cin, cout, 3, 2 if scale == "down" else 1, bias=not norm)
        self.norm = _Norm(cout) if norm else None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        if self.norm is not None:
            x = self.norm.norm(x)
        return F.leaky_relu(x, 0.2) if self.act else x


class _Norm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, scale: str = "none") -> None:
        super().__init__()
        self.shortcut_func = None if (scale == "none" and cin == cout) else _Conv(cin, cout, scale)
        first, second = {"down": ("none", "down"), "up": ("up", "none"), "none": ("none", "none")}[scale]
        self.conv1 = _Conv(cin, cout, first, norm=True, act=True)
        self.conv2 = _Conv(cout, cout, second, norm=True, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.shortcut_func is None else self.shortcut_func(x)
        return idt + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """ParseNet: ``(B, 3, 512, 512)`` RGB in [-1, 1] → ``(logits (B, 19, 512, 512), image (B, 3, 512, 512))``.

    Args:
        in_size / out_size: input and output side (512 for the released file).
        min_feat_size: side of the bottleneck feature map.
        base_ch: width of the first conv; widths are clipped to ``ch_range``.
        parsing_ch: number of classes.
        res_depth: residual blocks in the body.
    """

    def __init__(self, in_size: int = 512, out_size: int = 512, min_feat_size: int = 32, base_ch: int = 64,
                 parsing_ch: int = 19, res_depth: int = 10, ch_range: tuple[int, int] = (32, 256)) -> None:
        super().__init__()
        lo, hi = ch_range

        def clip(c: int) -> int:
            return max(lo, min(c, hi))

        min_feat_size = min(in_size, min_feat_size)
        down, up = int(math.log2(in_size // min_feat_size)), int(math.log2(out_size // min_feat_size))
        enc: list[nn.Module] = [_Conv(3, base_ch)]
        ch = base_ch
        for _ in range(down):
            enc.append(_ResBlock(clip(ch), clip(ch * 2), "down"))
            ch *= 2
        self.encoder = nn.Sequential(*enc)
        self.body = nn.Sequential(*[_ResBlock(clip(ch), clip(ch)) for _ in range(res_depth)])
        dec = []
        for _ in range(up):
            dec.append(_ResBlock(clip(ch), clip(ch // 2), "up"))
            ch //= 2
        self.decoder = nn.Sequential(*dec)
        self.out_img_conv = _Conv(clip(ch), 3)
        self.out_mask_conv = _Conv(clip(ch), parsing_ch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.encoder(x)
        x = self.decoder(feat + self.body(feat))
        return self.out_mask_conv(x), self.out_img_conv(x)


def load_parsenet(path: str | Path) -> ParseNet:
    """Build :class:`ParseNet` (512) and load facexlib's ``parsing_parsenet.pth`` (``weights_only``)."""
    from ..errors import WeightsNotFoundError
    from ..io.state_dicts import load_checked, unwrap_state_dict
    from ..safe_load import load_torch_checkpoint

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"face-parsing model not found: {path}. Put facexlib's {PARSENET_FILE} there; osdface never downloads."
        )
    sd = unwrap_state_dict(load_torch_checkpoint(path), path)
    return load_checked(ParseNet(), sd, path, "a ParseNet state dict").eval()


class FaceParser:
    """Paste masks from a parsing network.

    Args:
        net: a :class:`ParseNet` (or any module mapping ``(B, 3, R, R)`` in [-1, 1] to class logits
            first in its output).
        resolution: side the network runs at (512 for the released ParseNet).
        blur: Gaussian blur sigma of the binary mask, as a fraction of the crop size
            (CodeFormer blurs twice with σ = 11 at 512 ≈ 0.03).
    """

    def __init__(self, net: nn.Module, resolution: int = 512, blur: float = 0.03) -> None:
        self.net = net.eval()
        self.resolution = int(resolution)
        self.blur = float(blur)

    @classmethod
    def from_file(cls, path: str | Path, device: str | None = None) -> FaceParser:
        return cls(load_parsenet(path).to(torch.device(device or "cpu")))

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 RGB restored crops → ``(N, S, S)`` float32 masks in [0, 1]."""
        n, s = faces.shape[0], faces.shape[1]
        p = next(self.net.parameters())
        x = torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if s != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        with torch.inference_mode():
            out = self.net(x.to(p.device, p.dtype))
        logits = out[0] if isinstance(out, (tuple, list)) else out
        labels = logits.argmax(1).cpu().numpy()  # (N, R, R)
        keep = np.asarray(FACE_CLASSES, dtype=np.float32)
        masks = np.empty((n, s, s), np.float32)
        sigma = max(self.blur * s, 0.5)
        border = max(1, round(s * 10 / 512))
        for i in range(n):
            m = keep[np.clip(labels[i], 0, len(keep) - 1)]
            if m.shape[0] != s:
                m = cv2.resize(m, (s, s), interpolation=cv2.INTER_NEAREST)
            m = cv2.GaussianBlur(m, (0, 0), sigma)
            m = cv2.GaussianBlur(m, (0, 0), sigma)
            m[:border], m[-border:], m[:, :border], m[:, -border:] = 0, 0, 0, 0
            masks[i] = np.clip(m, 0, 1)
        return masks
