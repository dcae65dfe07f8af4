"""RetinaFace (ResNet-50 / MobileNet-0.25) with 5 landmarks, loadable from facexlib's weight files.

Architecture of Deng et al., "RetinaFace: Single-stage Dense Face Localisation in the Wild"
(CVPR 2020), as implemented by biubug6/Pytorch_Retinaface (MIT) and packaged by xinntao/facexlib
(MIT) — ``detection_Resnet50_Final.pth`` / ``detection_mobilenet0.25_Final.pth``. Re-written here
with the same module names so those state dicts load with ``strict=True``; the ResNet-50 trunk is
written out so torchvision is not needed.

Inputs are BGR float images minus the mean ``(104, 117, 123)``, as the original.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidSettingError

#: Per-network settings (anchor sizes per level, strides, box variances, trunk widths).
RETINAFACE_CONFIGS = {
    "resnet50": {"min_sizes": ((16, 32), (64, 128), (256, 512)), "steps": (8, 16, 32), "variance": (0.1, 0.2),
                 "in_channel": 256, "out_channel": 256},
    "mobilenet0.25": {"min_sizes": ((16, 32), (64, 128), (256, 512)), "steps": (8, 16, 32),
                      "variance": (0.1, 0.2), "in_channel": 32, "out_channel": 64},
}
#: BGR mean subtracted from the input.
BGR_MEAN = (104.0, 117.0, 123.0)


def _conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3, leaky: float | None = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky, inplace=True))
    return nn.Sequential(*layers)


def _conv_dw(cin: int, cout: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.LeakyReLU(leaky, inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(leaky, inplace=True),
    )


class _MobileNetV1Trunk(nn.Module):
    """MobileNet-0.25 trunk; returns the stage1/2/3 features (strides 8/16/32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(_conv_bn(3, 8, 2, leaky=0.1), _conv_dw(8, 16, 1), _conv_dw(16, 32, 2),
                                    _conv_dw(32, 32, 1), _conv_dw(32, 64, 2), _conv_dw(64, 64, 1))
        self.stage2 = nn.Sequential(_conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class _ResNet50Trunk(nn.Module):
    """torchvision-layout ResNet-50 up to ``layer4``; returns layer2/3/4 (strides 8/16/32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            layer = []
            for j in range(blocks):
                layer.append(_Bottleneck(cin, width, stride if j == 0 else 1))
                cin = width * 4
            setattr(self, f"layer{i}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class _FPN(nn.Module):
    def __init__(self, in_channels: list[int], out: int) -> None:
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0
        self.output1 = _conv_bn(in_channels[0], out, k=1, leaky=leaky)
        self.output2 = _conv_bn(in_channels[1], out, k=1, leaky=leaky)
        self.output3 = _conv_bn(in_channels[2], out, k=1, leaky=leaky)
        self.merge1 = _conv_bn(out, out, leaky=leaky)
        self.merge2 = _conv_bn(out, out, leaky=leaky)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class _SSH(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        leaky = 0.1 if cout <= 64 else 0.0
        self.conv3X3 = _conv_bn(cin, cout // 2, leaky=None)
        self.conv5X5_1 = _conv_bn(cin, cout // 4, leaky=leaky)
        self.conv5X5_2 = _conv_bn(cout // 4, cout // 4, leaky=None)
        self.conv7X7_2 = _conv_bn(cout // 4, cout // 4, leaky=leaky)
        self.conv7x7_3 = _conv_bn(cout // 4, cout // 4, leaky=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5_1 = self.conv5X5_1(x)
        c7_2 = self.conv7X7_2(c5_1)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(c5_1), self.conv7x7_3(c7_2)], dim=1))


class _Head(nn.Module):
    def __init__(self, cin: int, num_anchors: int, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(cin, num_anchors * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)  # (B, H, W, A·k)
        return out.reshape(out.shape[0], -1, self.per_anchor)  # (B, H·W·A, k)


class RetinaFaceNet(nn.Module):
    """RetinaFace network. ``forward`` returns ``(loc (B,N,4), conf (B,N,2) softmaxed, landm (B,N,10))``.

    Args:
        network: ``"resnet50"`` or ``"mobilenet0.25"``.
    """

    def __init__(self, network: str = "resnet50") -> None:
        super().__init__()
        if network not in RETINAFACE_CONFIGS:
            raise InvalidSettingError(f"unknown RetinaFace network {network!r}; choose from {sorted(RETINAFACE_CONFIGS)}")
        self.network = network
        cfg = RETINAFACE_CONFIGS[network]
        self.body = _ResNet50Trunk() if network == "resnet50" else _MobileNetV1Trunk()
        c, out = cfg["in_channel"], cfg["out_channel"]
        self.fpn = _FPN([c * 2, c * 4, c * 8], out)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(out, out), _SSH(out, out), _SSH(out, out)
        self.ClassHead = nn.ModuleList(_Head(out, 2, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(out, 2, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(out, 2, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        landm = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, F.softmax(conf, dim=-1), landm


def prior_boxes(network: str, height: int, width: int) -> torch.Tensor:
    """Anchors ``(N, 4)`` as ``(cx, cy, w, h)`` relative to the image size, in the network's order."""
    cfg = RETINAFACE_CONFIGS[network]
    out = []
    for sizes, step in zip(cfg["min_sizes"], cfg["steps"]):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        ys, xs = torch.meshgrid(torch.arange(fh, dtype=torch.float64), torch.arange(fw, dtype=torch.float64),
                                indexing="ij")
        cx = ((xs + 0.5) * step / width).reshape(-1, 1)
        cy = ((ys + 0.5) * step / height).reshape(-1, 1)
        per = [torch.cat([cx, cy, torch.full_like(cx, s / width), torch.full_like(cy, s / height)], 1) for s in sizes]
        out.append(torch.stack(per, 1).reshape(-1, 4))  # (fh·fw·A, 4), anchors innermost
    return torch.cat(out).float()


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variance=(0.1, 0.2)) -> torch.Tensor:
    """Regression ``(N, 4)`` + priors → boxes ``(N, 4)`` ``[x0, y0, x1, y1]`` (relative units)."""
    centre = priors[:, :2] + loc[:, :2] * variance[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * variance[1])
    return torch.cat([centre - size / 2, centre + size / 2], 1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor, variance=(0.1, 0.2)) -> torch.Tensor:
    """Regression ``(N, 10)`` + priors → landmarks ``(N, 10)`` ``(x, y) × 5`` (relative units)."""
    p = pre.reshape(-1, 5, 2)
    return (priors[:, None, :2] + p * variance[0] * priors[:, None, 2:]).reshape(-1, 10)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes.T
    areas = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        h = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def load_retinaface(path: str | Path, network: str | None = None) -> RetinaFaceNet:
    """Build a :class:`RetinaFaceNet` and load a facexlib / Pytorch_Retinaface ``.pth`` (``weights_only``).

    The network is guessed from the file name (``mobilenet`` → MobileNet-0.25) unless given.
    A ``module.`` prefix (DataParallel) is stripped.
    """
    from ..errors import WeightsNotFoundError
    from ..io.state_dicts import load_checked, unwrap_state_dict
    from ..safe_load import load_torch_checkpoint

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: RetinaFace weight file not found")
    if network is None:
        network = "mobilenet0.25" if "mobilenet" in path.name.lower() else "resnet50"
    sd = unwrap_state_dict(load_torch_checkpoint(path), path)
    return load_checked(RetinaFaceNet(network), sd, path, f"a RetinaFace-{network} state dict").eval()
