"""MUSIQ, the multi-scale image quality transformer (no-reference, higher is better).

Ke, Wang, Wang, Milanfar, Yang, "MUSIQ: Multi-scale Image Quality Transformer", ICCV 2021;
original code google-research/google-research ``musiq`` (Apache-2.0). Implemented here from the
paper and the original model; the module names, the pre-processing and the read-out follow the
PyTorch port used by the paper's numbers (pyiqa 0.1.12 ``musiq`` = KonIQ-10k checkpoint
``musiq_koniq_ckpt-e95806b9.pth``) so that its released file loads unchanged and the scores match:

* input ``(B, 3, H, W)`` RGB in [0, 1] is mapped to [-1, 1] (``2 x - 1``);
* the multi-scale representation is, in this order: the image resized (aspect preserved) so that
  its longer side is 224, then 384, then the image at its own resolution. The resized sizes are
  ``round(h * L / max(h, w))`` (Python/banker's rounding) and the resize is PyTorch bicubic
  (Keys a = -0.75, half-pixel centres, ``align_corners=False``, **no antialias**, no clamping) on the
  [-1, 1] values. (The TF original used a Gaussian anti-aliased resize; the released PyTorch
  checkpoint's numbers use bicubic, so we do.)
* every scale is cut into non-overlapping 32×32 patches after TF-"SAME" zero padding (in [-1, 1]
  units, i.e. mid-gray; the padding total ``ceil(n / 32) * 32 - n`` is split ``floor`` before /
  rest after); patches are taken in row-major order;
* each patch gets a hash-based spatial index on a 10×10 grid (row and column of the patch mapped to
  the grid by PyTorch ``nearest`` interpolation of ``arange(10)``: ``floor(i * 10 / count)``) and a
  scale index (0, 1, 2 for 224, 384, original);
* the two resized scales are padded to ``ceil(L / 32) ** 2`` tokens (49 and 144) with all-zero
  patches whose spatial and scale index are 0 and whose mask is 0; the original resolution keeps
  all its patches (no maximum sequence length). Attention logits between any pair involving a
  masked token are replaced by -1000 before the softmax (the released port's masking);
* patch stem: weight-standardised 7×7/2 conv (64) + GroupNorm + ReLU + 3×3/2 max-pool (TF "SAME"
  padding) + one bottleneck block (64 → 256), flattened in (h, w, c) order, linear embedding to 384;
* CLS token + 14 pre-norm transformer blocks (6 heads, MLP 1152, exact GELU, LayerNorm eps 1e-6);
* read-out: the linear head on the final CLS token. With one output (KonIQ) the score is that value
  (≈ MOS on 0–100); with ``num_class > 1`` (the AVA release) the head is softmaxed and the score is
  the mean of the distribution over 1..num_class.

Images of one batch share their size, so they are scored together; any ``H × W`` is accepted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import Mlp  # fc1 → exact GELU → fc2 (the released key names)
from torch import nn

from ..errors import InvalidSettingError
from ..image import ImageError
from ..io.networks import freeze, read_state_dict, require_weight_file
from ..io.state_dicts import load_checked
from ..utils.logging import get_logger
from .base import Metric

logger = get_logger(__name__)

#: Architecture of the released MUSIQ checkpoints (pyiqa's ``MUSIQ`` defaults).
MUSIQ_CONFIG: dict = {
    "patch_size": 32,
    "hidden_size": 384,
    "mlp_dim": 1152,
    "num_heads": 6,
    "num_layers": 14,
    "spatial_pos_grid_size": 10,
    "longer_side_lengths": (224, 384),
    "num_class": 1,
}

#: Value given to masked attention logits (the released PyTorch port's choice).
MASKED_LOGIT = -1e3

_STEM_WIDTH = 64  # ResNet root width; the bottleneck widens it 4×


# ----------------------------------------------------------------------------------------------
# Pre-processing: multi-scale patches
# ----------------------------------------------------------------------------------------------


def resized_size(h: int, w: int, longer_side: int) -> tuple[int, int]:
    """Aspect-preserving size whose longer side is ``longer_side``: ``round(h * r), round(w * r)``.

    ``r = longer_side / max(h, w)``; Python ``round`` (half to even), like ``tf.round``. A side that
    would round to 0 (aspect ratio beyond ~1:450 at 224, where the reference port fails) is 1.
    """
    ratio = longer_side / max(h, w)
    return max(1, round(h * ratio)), max(1, round(w * ratio))


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` like TensorFlow's ``padding="SAME"``.

    Total padding per dim ``max((ceil(n / stride) - 1) * stride + kernel - n, 0)``, ``floor`` half
    before, the rest after.
    """
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


def hashed_positions(grid_size: int, count_h: int, count_w: int, device=None) -> torch.Tensor:
    """Hash-based spatial index of each patch of a ``count_h × count_w`` patch grid.

    Rows and columns are mapped to ``grid_size`` cells by nearest-neighbour resampling of
    ``arange(grid_size)`` (PyTorch ``nearest``: cell ``floor(i * grid_size / count)``).

    Returns:
        int64 ``(count_h * count_w,)`` in ``[0, grid_size ** 2)``, row-major.
    """
    grid = torch.arange(grid_size, dtype=torch.float32, device=device).reshape(1, 1, grid_size)
    rows = F.interpolate(grid, size=count_h, mode="nearest").reshape(count_h).long()
    cols = F.interpolate(grid, size=count_w, mode="nearest").reshape(count_w).long()
    return (rows[:, None] * grid_size + cols[None, :]).reshape(-1)


def image_patches(x: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, int, int]:
    """Non-overlapping patches of ``x`` after TF-"SAME" zero padding.

    Args:
        x: ``(B, C, H, W)``.
        patch_size: patch side ``p`` (also the stride).

    Returns:
        ``(patches, count_h, count_w)`` with patches ``(B, count_h * count_w, C, p, p)`` in row-major
        patch order.
    """
    b, c = x.shape[:2]
    x = same_pad(x, patch_size, patch_size)
    nh, nw = x.shape[-2] // patch_size, x.shape[-1] // patch_size
    p = x.reshape(b, c, nh, patch_size, nw, patch_size).permute(0, 2, 4, 1, 3, 5)
    return p.reshape(b, nh * nw, c, patch_size, patch_size), nh, nw


def multiscale_patches(
    x: torch.Tensor,
    patch_size: int = 32,
    grid_size: int = 10,
    longer_side_lengths: Sequence[int] = (224, 384),
    max_seq_len_from_original_res: int | None = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MUSIQ's multi-scale token set of a batch of same-size images.

    Args:
        x: ``(B, 3, H, W)`` float, already normalised to [-1, 1].
        patch_size: patch side (32).
        grid_size: hash grid side (10).
        longer_side_lengths: longer sides of the resized scales (sorted ascending; scale ids follow).
        max_seq_len_from_original_res: tokens kept from the original resolution (padded / cut to
            this many); ``< 0``: all of them (the released setting); ``None``: no original scale.

    Returns:
        ``(patches, spatial, scale, mask)``: patches ``(B, N, 3, p, p)`` (x's dtype), spatial and
        scale indices int64 ``(N,)``, mask bool ``(N,)`` (False for padding tokens).
    """
    h, w = x.shape[-2:]
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(img: torch.Tensor, scale_id: int, max_len: int) -> None:
        p, nh, nw = image_patches(img, patch_size)
        n = p.shape[1]
        spatial = hashed_positions(grid_size, nh, nw, device=x.device)
        scale = torch.full((n,), scale_id, dtype=torch.long, device=x.device)
        mask = torch.ones(n, dtype=torch.bool, device=x.device)
        if max_len >= 0:
            if n >= max_len:
                p, spatial, scale, mask = p[:, :max_len], spatial[:max_len], scale[:max_len], mask[:max_len]
            else:
                extra = max_len - n
                p = torch.cat([p, p.new_zeros((p.shape[0], extra) + p.shape[2:])], dim=1)
                zeros = torch.zeros(extra, dtype=torch.long, device=x.device)
                spatial, scale = torch.cat([spatial, zeros]), torch.cat([scale, zeros])
                mask = torch.cat([mask, torch.zeros(extra, dtype=torch.bool, device=x.device)])
        parts.append((p, spatial, scale, mask))

    lengths = sorted(longer_side_lengths)
    for scale_id, side in enumerate(lengths):
        rh, rw = resized_size(h, w, side)
        resized = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False)
        add(resized, scale_id, math.ceil(side / patch_size) ** 2)
    if max_seq_len_from_original_res is not None:
        add(x, len(lengths), max_seq_len_from_original_res)
    patches, spatial, scale, mask = zip(*parts)
    return torch.cat(patches, dim=1), torch.cat(spatial), torch.cat(scale), torch.cat(mask)


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


class StdConv(nn.Conv2d):
    """Weight-standardised conv with TF-"SAME" padding (no dilation/groups).

    The kernel is standardised per output channel: ``(w - mean) / (std + 1e-5)`` with the unbiased
    standard deviation over ``(in, kh, kw)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        w = self.weight
        w = w - w.mean((1, 2, 3), keepdim=True)
        w = w / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(same_pad(x, self.kernel_size[0], self.stride[0]), w, self.bias, self.stride)


class Bottleneck(nn.Module):
    """ResNet-v1 bottleneck with StdConv + GroupNorm(32, eps 1e-4); width = ``inplanes``."""

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1):
        super().__init__()
        width = inplanes
        self.conv1 = StdConv(inplanes, width, 1, 1, bias=False)
        self.gn1 = nn.GroupNorm(32, width, eps=1e-4)
        self.conv2 = StdConv(width, width, 3, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, width, eps=1e-4)
        self.conv3 = StdConv(width, outplanes, 1, 1, bias=False)
        self.gn3 = nn.GroupNorm(32, outplanes, eps=1e-4)
        self.needs_projection = inplanes != outplanes or stride != 1
        if self.needs_projection:
            self.conv_proj = StdConv(inplanes, outplanes, 1, stride, bias=False)
            self.gn_proj = nn.GroupNorm(32, outplanes, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        identity = self.gn_proj(self.conv_proj(x)) if self.needs_projection else x
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        return F.relu(self.gn3(self.conv3(y)) + identity)


class MultiHeadAttention(nn.Module):
    """Self-attention with separate ``query``/``key``/``value`` projections and an ``out`` projection.

    ``mask`` ``(B, N)`` bool: logits of pairs where either token is masked become :data:`MASKED_LOGIT`.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise InvalidSettingError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        b, n, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            pair = mask[:, None, :, None] & mask[:, None, None, :]
            logits = logits.masked_fill(~pair, MASKED_LOGIT)
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.out(out)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6)."""

    def __init__(self, dim: int, mlp_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x + self.attention(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class AddHashSpatialPositionEmbs(nn.Module):
    """Learnable hash-based spatial embedding table ``position_emb`` ``(1, G*G, D)``."""

    def __init__(self, grid_size: int, dim: int):
        super().__init__()
        self.position_emb = nn.Parameter(torch.empty(1, grid_size * grid_size, dim).normal_(std=0.02))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.position_emb[0][positions]


class AddScaleEmbs(nn.Module):
    """Learnable scale embedding table ``scale_emb`` ``(num_scales, D)``."""

    def __init__(self, num_scales: int, dim: int):
        super().__init__()
        self.scale_emb = nn.Parameter(torch.empty(num_scales, dim).normal_(std=0.02))

    def forward(self, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.scale_emb[scales]


class TransformerEncoder(nn.Module):
    """Embeddings + CLS + ``num_layers`` blocks (``transformer.encoderblock_{i}``) + final LayerNorm."""

    def __init__(self, dim: int, mlp_dim: int, num_heads: int, num_layers: int, num_scales: int, grid_size: int):
        super().__init__()
        self.posembed_input = AddHashSpatialPositionEmbs(grid_size, dim)
        self.scaleembed_input = AddScaleEmbs(num_scales, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.transformer = nn.ModuleDict(
            {f"encoderblock_{i}": TransformerBlock(dim, mlp_dim, num_heads) for i in range(num_layers)}
        )

    def forward(self, x: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, N, D)``, indices ``(N,)``, mask bool ``(N,)`` → ``(B, 1 + N, D)`` (CLS first)."""
        b = x.shape[0]
        x = self.scaleembed_input(self.posembed_input(x, spatial), scale)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
        full_mask = torch.cat([mask.new_ones(1), mask]).expand(b, -1)
        for block in self.transformer.values():
            x = block(x, full_mask)
        return self.encoder_norm(x)


class MUSIQ(nn.Module):
    """MUSIQ network: ``(B, 3, H, W)`` RGB in [0, 1] → ``(B,)`` quality score.

    Parameter names follow the released PyTorch checkpoints (``conv_root``, ``gn_root``,
    ``block1.*``, ``embedding``, ``transformer_encoder.*``, ``head`` / ``head.0``).

    Args:
        patch_size: patch side (32); must be a multiple of 4.
        hidden_size, mlp_dim, num_heads, num_layers: transformer size (384, 1152, 6, 14).
        spatial_pos_grid_size: hash grid side G (10).
        longer_side_lengths: resized scales (224, 384).
        num_class: head outputs; 1 → the score is the head output, > 1 → softmax and mean of
            ``1..num_class`` (``head`` is then ``Sequential(Linear, Softmax)``, keys ``head.0.*``).
        max_seq_len_from_original_res: see :func:`multiscale_patches` (-1: all patches).
    """

    def __init__(
        self,
        patch_size: int = 32,
        hidden_size: int = 384,
        mlp_dim: int = 1152,
        num_heads: int = 6,
        num_layers: int = 14,
        spatial_pos_grid_size: int = 10,
        longer_side_lengths: Sequence[int] = (224, 384),
        num_class: int = 1,
        max_seq_len_from_original_res: int | None = -1,
    ):
        super().__init__()
        if patch_size % 4:
            raise InvalidSettingError(f"patch_size must be a multiple of 4, got {patch_size}")
        self.patch_size = patch_size
        self.grid_size = spatial_pos_grid_size
        self.longer_side_lengths = tuple(sorted(longer_side_lengths))
        self.max_seq_len_from_original_res = max_seq_len_from_original_res
        num_scales = len(self.longer_side_lengths) + 1  # + the original resolution (always in the table)
        self.conv_root = StdConv(3, _STEM_WIDTH, 7, 2, bias=False)
        self.gn_root = nn.GroupNorm(32, _STEM_WIDTH, eps=1e-6)
        self.block1 = Bottleneck(_STEM_WIDTH, 4 * _STEM_WIDTH)
        self.embedding = nn.Linear(4 * _STEM_WIDTH * (patch_size // 4) ** 2, hidden_size)
        self.transformer_encoder = TransformerEncoder(hidden_size, mlp_dim, num_heads, num_layers, num_scales,
                                                      spatial_pos_grid_size)
        self.num_class = num_class
        if num_class > 1:
            self.head = nn.Sequential(nn.Linear(hidden_size, num_class), nn.Softmax(dim=-1))
        else:
            self.head = nn.Linear(hidden_size, num_class)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[0, 1] images ``(B, 3, H, W)`` → :func:`multiscale_patches` of ``2 x - 1``."""
        return multiscale_patches((x - 0.5) * 2, self.patch_size, self.grid_size, self.longer_side_lengths,
                                  self.max_seq_len_from_original_res)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch stem + linear embedding: ``(B, N, 3, p, p)`` → ``(B, N, hidden_size)``."""
        b, n = patches.shape[:2]
        y = patches.reshape(b * n, 3, self.patch_size, self.patch_size)
        y = F.relu(self.gn_root(self.conv_root(y)))
        y = F.max_pool2d(same_pad(y, 3, 2), 3, 2)
        y = self.block1(y)
        return self.embedding(y.permute(0, 2, 3, 1).reshape(b, n, -1))  # (h, w, c) order, as the TF original

    def forward(self, x: torch.Tensor, return_dist: bool = False) -> torch.Tensor:
        """Scores ``(B,)`` of ``(B, 3, H, W)`` RGB in [0, 1] (the head output; ``(B, num_class)`` if ``return_dist``)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ImageError(f"MUSIQ expects (B, 3, H, W) RGB images, got shape {tuple(x.shape)}")
        patches, spatial, scale, mask = self.tokens(x)
        feats = self.transformer_encoder(self.embed_patches(patches), spatial, scale, mask)
        q = self.head(feats[:, 0])
        if return_dist:
            return q
        levels = torch.arange(1, q.shape[-1] + 1, dtype=q.dtype, device=q.device)
        return (q * levels).sum(-1)


# ----------------------------------------------------------------------------------------------
# Checkpoint loading
# ----------------------------------------------------------------------------------------------

def load_musiq_weights(model: MUSIQ, path: str | os.PathLike) -> MUSIQ:
    """Load a MUSIQ checkpoint (``.pth`` without code execution, or ``.safetensors``) with a strict check.

    Raises:
        ModelFileError: missing / unexpected / wrong-shape keys (the message names the file and the
            first offending keys), or an unreadable file.
    """
    path = Path(path)
    return load_checked(model, read_state_dict(path), path, "a MUSIQ (KonIQ) checkpoint of the expected layout")


def build_musiq(weights_dir: str | os.PathLike | None = None, pretrained: bool = True, seed: int = 0,
                **arch) -> MUSIQ:
    """MUSIQ in eval mode with frozen parameters.

    Args:
        weights_dir: metrics weights folder (``musiq_koniq.pth`` or ``musiq_koniq_ckpt-e95806b9.pth``).
        pretrained: ``False`` → seeded random weights (``seed``), no file read.
        **arch: overrides of :data:`MUSIQ_CONFIG` (tests use tiny configurations).

    Raises:
        WeightsNotFoundError: ``pretrained`` and the file is missing (names it and where to put it).
    """
    cfg = {**MUSIQ_CONFIG, **arch}
    path = None
    if pretrained:
        path = require_weight_file("musiq", weights_dir)  # fail before building the network
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MUSIQ(**cfg)
    if path is not None:
        load_musiq_weights(model, path)
        logger.info("MUSIQ weights loaded from %s", path)
    return freeze(model)


class MUSIQMetric(Metric):
    """MUSIQ-KonIQ score (pyiqa ``musiq``): no reference, higher is better, ≈ 0–100.

    ``metric(pred)`` with ``pred`` ``(B, 3, H, W)`` RGB in [0, 1] (any size, one size per batch)
    → ``(B,)`` float64 scores. The network runs in its parameters' dtype (float32) on ``device``.

    Args:
        device: torch device.
        weights_dir: metrics weights folder (default ``$OSDFACE_HOME/metrics``).
        pretrained: ``False`` → seeded random weights, no file read (tests).
        arch: architecture overrides of :data:`MUSIQ_CONFIG` (tests only; the released file
            needs the defaults).
    """

    name, full_reference, lower_better = "musiq", False, False

    def __init__(self, device="cpu", weights_dir=None, pretrained: bool = True, arch: dict | None = None, **_):
        super().__init__(device)
        self.net = build_musiq(weights_dir=weights_dir, pretrained=pretrained, **(arch or {})).to(self.device)

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → ``(B,)`` scores."""
        dtype = next(self.net.parameters()).dtype
        return self.net(pred.to(self.device, dtype))
