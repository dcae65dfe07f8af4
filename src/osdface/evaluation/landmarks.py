"""LMD: landmark distance with the AdaptiveWingLoss FAN (4 hourglasses, WFLW 98 points), VQFR protocol.

The paper's LMD is VQFR's ``metric_paper/calculate_landmark_distance.py``: for every (restored, GT)
pair it runs ``FAN.get_landmarks`` of VQFR's ``vqfr/archs/awing_arch.py`` (the AdaptiveWingLoss
network, ``FAN(num_modules=4, end_relu=False, gray_scale=False, num_landmarks=98)``, weights
``alignment_WFLW_4HG.pth``) on both images and averages
``np.sqrt(((gt - pred) ** 2).sum(1)).mean()`` over the image pairs. This module reproduces that
protocol step by step:

1. the image is 8-bit (our float input is rounded with :func:`osdface.image.to_uint8`, i.e. the
   PNG the script would read with ``cv2.imread``);
2. ``cv2.resize(img, (256, 256))`` — OpenCV's default ``INTER_LINEAR`` on the uint8 image,
   whatever its size (non-square images are stretched);
3. RGB order (the script flips ``cv2.imread``'s BGR), float32, divided by 255 → [0, 1]
   (*not* [-1, 1], whatever the script's comment says);
4. FAN forward; the last hourglass's heat maps without the boundary channel, ``(98, 64, 64)``;
5. VQFR's ``calculate_points`` decoding (:func:`decode_heatmaps`): arg-max cell, a quarter-cell
   step towards the larger neighbour in x and y, ``+ 0.5``; its quirks are kept on purpose:
   neighbours are read in the *flattened* map (a peak on the last column reads its right
   neighbour on the next row); if *any* of the image's 98 peaks lies in the last row, *every*
   point's "below" value is read at the last cell (4095), and if any lies in the first row (or on
   the first cell of the second row), every point's "above" value is cell 0's;
6. scaled by ``(W / 64, H / 64)`` → pixel coordinates of the *original* image (so LMD is measured
   in pixels of the evaluated images, e.g. 512×512 FFHQ crops);
7. per pair: mean over the 98 points of the Euclidean distance; over a set: the plain mean
   (``sum / len``, which is what :func:`osdface.evaluation.folder.evaluate_folder` does).

Differences from the reference code, none of which changes a value it produces: the coordinate
channels are built for the input's size, device and dtype (the reference fixes 256/64 and
hard-codes ``.cuda()``; the FAN input is always 256×256); images are
batched (every image is decoded on its own, exactly as the script's one-image calls); where the
reference raises ``IndexError`` (a peak on the very last heat-map cell, whose x neighbour is
past the end) the index wraps around, as numpy does for the first cell's ``-1``.

The AdaptiveWingLoss repository's own decoder (``utils.get_preds_fromhm``) is *not* the paper's:
it reads true 2-D neighbours and skips the quarter-cell step on the map border. VQFR's script
never calls it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io.networks import freeze, read_state_dict, require_weight_file
from ..io.state_dicts import load_checked
from ..utils.logging import get_logger
from .base import Metric

logger = get_logger(__name__)

#: Landmarks of the WFLW annotation.
NUM_LANDMARKS = 98
#: Network input side (pixels).
INPUT_SIZE = 256
#: Heat-map side (cells).
HEATMAP_SIZE = 64


# ----------------------------------------------------------------------------------------------
# Network (AdaptiveWingLoss core/models.py + core/coord_conv.py; parameter names kept)
# ----------------------------------------------------------------------------------------------


def _coord_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``AddCoordsTh``'s ``xx`` (varies along rows) and ``yy`` (along columns): ``(1, 1, H, W)``, [-1, 1]."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device, dtype=x.dtype) / (h - 1) * 2 - 1
    cols = torch.arange(w, device=x.device, dtype=x.dtype) / (w - 1) * 2 - 1
    return rows.view(1, 1, h, 1).expand(1, 1, h, w), cols.view(1, 1, 1, w).expand(1, 1, h, w)


class CoordConv(nn.Module):
    """``CoordConvTh``: concat (x, y, r[, boundary x, boundary y]) channels, then a conv.

    ``forward(x, heatmap=None)`` → ``(conv output, last two concatenated channels)``. With
    ``with_boundary`` and a ``heatmap`` (the previous stack's ``(B, L + 1, h, w)`` output) the
    coordinates masked by ``clamp(heatmap[:, -1:], 0, 1) > 0.05`` are appended as well.
    """

    def __init__(self, in_channels: int, out_channels: int, with_boundary: bool = False,
                 first_one: bool = False, **conv_kwargs):
        super().__init__()
        self.with_boundary = with_boundary
        extra = 3 + (2 if with_boundary and not first_one else 0)
        self.conv = nn.Conv2d(in_channels + extra, out_channels, **conv_kwargs)

    def forward(self, x: torch.Tensor, heatmap: torch.Tensor | None = None):
        b = x.shape[0]
        xx, yy = _coord_channels(x)
        rr = torch.sqrt(xx.pow(2) + yy.pow(2))
        rr = rr / rr.max()
        parts = [x, xx.expand(b, -1, -1, -1), yy.expand(b, -1, -1, -1), rr.expand(b, -1, -1, -1)]
        if self.with_boundary and heatmap is not None:
            mask = torch.clamp(heatmap[:, -1:], 0.0, 1.0) > 0.05
            zero = torch.zeros((), device=x.device, dtype=x.dtype)
            parts += [torch.where(mask, xx, zero), torch.where(mask, yy, zero)]
        ret = torch.cat(parts, dim=1)
        return self.conv(ret), ret[:, -2:]


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Pre-activation residual block of FAN: three BN-ReLU-3×3 convs (c/2, c/4, c/4) concatenated + skip."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, out_planes // 2)
        self.bn2 = nn.BatchNorm2d(out_planes // 2)
        self.conv2 = _conv3x3(out_planes // 2, out_planes // 4)
        self.bn3 = nn.BatchNorm2d(out_planes // 4)
        self.conv3 = _conv3x3(out_planes // 4, out_planes // 4)
        self.downsample = None
        if in_planes != out_planes:
            self.downsample = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(True),
                                            nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat((out1, out2, out3), 1) + residual


class HourGlass(nn.Module):
    """Depth-``depth`` hourglass of 256-channel :class:`ConvBlock` s after a boundary-aware CoordConv."""

    def __init__(self, depth: int = 4, first_one: bool = False):
        super().__init__()
        self.depth = depth
        self.coordconv = CoordConv(256, 256, with_boundary=True, first_one=first_one, kernel_size=1)
        self._generate_network(depth)

    def _generate_network(self, level: int) -> None:
        self.add_module(f"b1_{level}", ConvBlock(256, 256))
        self.add_module(f"b2_{level}", ConvBlock(256, 256))
        if level > 1:
            self._generate_network(level - 1)
        else:
            self.add_module(f"b2_plus_{level}", ConvBlock(256, 256))
        self.add_module(f"b3_{level}", ConvBlock(256, 256))

    def _forward(self, level: int, inp: torch.Tensor) -> torch.Tensor:
        up1 = self._modules[f"b1_{level}"](inp)
        low1 = self._modules[f"b2_{level}"](F.avg_pool2d(inp, 2, stride=2))
        if level > 1:
            low2 = self._forward(level - 1, low1)
        else:
            low2 = self._modules[f"b2_plus_{level}"](low1)
        low3 = self._modules[f"b3_{level}"](low2)
        return up1 + F.interpolate(low3, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor, heatmap: torch.Tensor | None):
        x, last_channel = self.coordconv(x, heatmap)
        return self._forward(self.depth, x), last_channel


class FAN(nn.Module):
    """AdaptiveWingLoss FAN (stacked hourglasses with CoordConv and boundary channels).

    ``FAN(num_modules=4, num_landmarks=98)`` is the network of ``alignment_WFLW_4HG.pth``; its
    ``state_dict`` keys are those of the reference implementation. ``forward(x)`` takes
    ``(B, 3, 256, 256)`` RGB float in [0, 1] and returns the list of the ``num_modules`` stacks'
    heat maps, each ``(B, num_landmarks + 1, 64, 64)`` (the last channel is the face boundary).

    Args:
        num_modules: stacked hourglasses (4 for the released WFLW model; fewer only for tests).
        end_relu: ReLU on every stack's heat maps (``False`` for the released model).
        num_landmarks: landmark heat maps (98 for WFLW).
    """

    def __init__(self, num_modules: int = 4, end_relu: bool = False, num_landmarks: int = NUM_LANDMARKS):
        super().__init__()
        self.num_modules, self.end_relu, self.num_landmarks = num_modules, end_relu, num_landmarks
        self.conv1 = CoordConv(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, 256)
        for i in range(num_modules):
            self.add_module(f"m{i}", HourGlass(4, first_one=i == 0))
            self.add_module(f"top_m_{i}", ConvBlock(256, 256))
            self.add_module(f"conv_last{i}", nn.Conv2d(256, 256, kernel_size=1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(256))
            self.add_module(f"l{i}", nn.Conv2d(256, num_landmarks + 1, kernel_size=1))
            if i < num_modules - 1:
                self.add_module(f"bl{i}", nn.Conv2d(256, 256, kernel_size=1))
                self.add_module(f"al{i}", nn.Conv2d(num_landmarks + 1, 256, kernel_size=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, _ = self.conv1(x)
        x = F.relu(self.bn1(x))
        x = F.avg_pool2d(self.conv2(x), 2, stride=2)
        previous = self.conv4(self.conv3(x))
        outputs: list[torch.Tensor] = []
        tmp_out = None
        for i in range(self.num_modules):
            hg, _ = self._modules[f"m{i}"](previous, tmp_out)
            ll = self._modules[f"top_m_{i}"](hg)
            ll = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](ll)))
            tmp_out = self._modules[f"l{i}"](ll)
            if self.end_relu:
                tmp_out = F.relu(tmp_out)
            outputs.append(tmp_out)
            if i < self.num_modules - 1:
                previous = previous + self._modules[f"bl{i}"](ll) + self._modules[f"al{i}"](tmp_out)
        return outputs


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def load_fan_checkpoint(model: FAN, path: str | os.PathLike) -> None:
    """Load ``alignment_WFLW_4HG.pth`` / ``WFLW_4HG.pth`` into ``model``, strictly.

    Accepted containers: ``{"state_dict": sd, ...}`` (the released file; VQFR loads it and takes
    its ``'state_dict'`` entry) or a bare ``sd``; a ``module.`` prefix (DataParallel) on every
    key is removed. BatchNorm ``num_batches_tracked`` counters may be absent (files saved before
    PyTorch 0.4.1; they play no part in inference). Anything else — a missing, unexpected or
    wrongly shaped tensor — raises :class:`~osdface.errors.ModelFileError` (a ``ValueError``) naming
    the file and the first offending keys. The file is read without executing code
    (:func:`osdface.safe_load.load_torch_checkpoint`).
    """
    path = Path(path)
    load_checked(model, read_state_dict(path), path,
                 "the AdaptiveWingLoss FAN-4HG WFLW checkpoint", lambda k: k.endswith("num_batches_tracked"))


def build_fan(weights_dir: str | os.PathLike | None = None, pretrained: bool = True, num_modules: int = 4,
              seed: int = 0) -> FAN:
    """The WFLW FAN in eval mode with frozen parameters.

    Args:
        weights_dir: metrics weights folder (default ``$OSDFACE_HOME/metrics``); must hold
            ``alignment_WFLW_4HG.pth`` (or ``WFLW_4HG.pth``) when ``pretrained``.
        pretrained: ``False`` → PyTorch's default initialisation under ``torch.manual_seed(seed)``
            (the global RNG is left untouched); no file is read.
        num_modules: stacked hourglasses; the released file has 4.
    """
    if pretrained:
        path = require_weight_file("fan_wflw", weights_dir)  # fail before building the network
        model = FAN(num_modules=num_modules)
        load_fan_checkpoint(model, path)
        logger.info("loaded FAN WFLW weights from %s", path)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FAN(num_modules=num_modules)
    return freeze(model)


# ----------------------------------------------------------------------------------------------
# Pre-processing and decoding (VQFR FAN.get_landmarks / calculate_points)
# ----------------------------------------------------------------------------------------------


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] → the FAN input ``(B, 3, 256, 256)`` float32 RGB in [0, 1] (CPU).

    As VQFR's ``get_landmarks`` on ``cv2.imread`` of the saved 8-bit image: round to uint8,
    ``cv2.resize(img, (256, 256))`` (``INTER_LINEAR``), float32 ``/ 255``.
    """
    import cv2

    from ..image import to_uint8

    imgs = [cv2.resize(a, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR) for a in to_uint8(x)]
    t = torch.from_numpy(np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2))).float()
    return t / 255.0


def decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """VQFR's ``calculate_points`` on every image on its own: ``(B, N, h, w)`` → ``(B, N, 2)`` float64.

    Output ``(x, y)`` in heat-map cells (cell ``c`` spans ``[c, c + 1)``): arg-max cell ``+ 0.5``,
    plus ``0.25 * sign(right - left)`` in x and ``0.25 * sign(below - above)`` in y, with the
    reference's neighbour reads in the flattened ``h * w`` map: right/left are the next/previous
    flat cells (wrapping around the ends); if any of the image's ``N`` peaks has flat index
    ``≥ h*w - w`` (last row), every "below" value is the last cell's; if any has flat index
    ``≤ w`` (first row, or the first cell of the second row), every "above" value is cell 0's.
    Ties in the arg-max go to the first flat index (as numpy's ``argmax``).
    """
    b, n, h, w = heatmaps.shape
    hw = h * w
    line = heatmaps.reshape(b, n, hw)
    idx = line.argmax(dim=2)  # (B, N), first maximum

    def at(i: torch.Tensor) -> torch.Tensor:
        return line.gather(2, i.unsqueeze(-1)).squeeze(-1)

    x_up, x_down = at((idx + 1) % hw), at((idx - 1) % hw)
    below_any = (idx + w >= hw).any(dim=1, keepdim=True)  # per image (VQFR decodes one image at a time)
    above_any = (idx - w <= 0).any(dim=1, keepdim=True)
    y_up = torch.where(below_any, line[..., hw - 1], at((idx + w).clamp(max=hw - 1)))
    y_down = torch.where(above_any, line[..., 0], at((idx - w).clamp(min=0)))
    step = torch.sign(torch.stack((x_up - x_down, y_up - y_down), dim=2)).double() * 0.25
    preds = torch.stack((idx % w, torch.div(idx, w, rounding_mode="floor")), dim=2).double()
    return preds + step + 0.5


def heatmaps_to_pixels(points: torch.Tensor, height: int, width: int, heatmap_size: int = HEATMAP_SIZE):
    """Heat-map cells ``(..., 2)`` → float64 pixels of a ``height × width`` image (VQFR's ``offset``)."""
    scale = torch.tensor([width / heatmap_size, height / heatmap_size], dtype=torch.float64,
                         device=points.device)
    return points.double() * scale


def landmark_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over points of the Euclidean distance, ``(B, N, 2)`` × 2 → ``(B,)`` float64.

    VQFR's ``get_landmark_distance``: ``np.sqrt(((gt - pred) ** 2).sum(1)).mean()``.
    """
    return ((a.double() - b.double()) ** 2).sum(-1).sqrt().mean(-1)


# ----------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------


class LMDMetric(Metric):
    """LMD: mean distance (pixels of the evaluated images) between the FAN WFLW landmarks of pred and gt.

    Full reference, lower is better; ``compute`` returns ``(B,)`` float64. The set value is the plain
    mean over images (VQFR's ``sum / len``). See the module docstring for the protocol.

    Args:
        device: where the FAN runs.
        weights_dir: metrics weights folder holding ``alignment_WFLW_4HG.pth`` (or ``WFLW_4HG.pth``).
        pretrained: ``False`` → seeded random weights, no file read (tests).
        num_modules: stacked hourglasses (4 = the released model; smaller only with ``pretrained=False``).
        batch_size: images per FAN forward (memory bound; results do not depend on it).
    """

    name, full_reference, lower_better = "lmd", True, True

    def __init__(self, device="cpu", weights_dir=None, pretrained: bool = True, num_modules: int = 4,
                 batch_size: int = 16, **kwargs):
        super().__init__(device)
        self.net = build_fan(weights_dir=weights_dir, pretrained=pretrained, num_modules=num_modules)
        self.net.to(self.device)
        self.batch_size = max(1, int(batch_size))

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @torch.no_grad()
    def heatmaps(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] → landmark heat maps ``(B, 98, 64, 64)`` (no boundary channel)."""
        inp = preprocess(x)
        outs = []
        for i in range(0, inp.shape[0], self.batch_size):
            chunk = inp[i:i + self.batch_size].to(self.device, self._dtype)
            outs.append(self.net(chunk)[-1][:, :-1])
        return torch.cat(outs)

    @torch.no_grad()
    def landmarks(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] → ``(B, 98, 2)`` float64 ``(x, y)`` in pixels of the input (CPU)."""
        h, w = x.shape[-2:]
        return heatmaps_to_pixels(decode_heatmaps(self.heatmaps(x).cpu()), h, w)

    def compute(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        pts = self.landmarks(torch.cat([pred, gt.to(pred.device)]))
        b = pred.shape[0]
        return landmark_distance(pts[b:], pts[:b])
