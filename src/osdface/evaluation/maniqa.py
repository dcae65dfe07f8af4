"""MANIQA, the multi-dimension attention network for no-reference IQA (higher is better).

Yang, Wu, Shi, Lao, Gong, Cao, Wang, Yang, "MANIQA: Multi-dimension Attention Network for
No-Reference Image Quality Assessment", CVPR Workshops 2022; original code IIGROUP/MANIQA
(Apache-2.0), its Swin blocks after Microsoft's Swin Transformer (MIT). Implemented here from the
paper and the original model; module names, pre-processing and read-out follow the PyTorch code
used by the paper's numbers (pyiqa 0.1.12 ``maniqa``) so that the released checkpoints load
unchanged and the scores match.

Which checkpoint: pyiqa 0.1.12's default ``maniqa`` is the **KonIQ-10k** model
(``train_dataset='koniq'``: IIGROUP's release ``ckpt_koniq10k.pt``, Swin residual scale 0.8).
``'pipal'`` (pyiqa's ``MANIQA_PIPAL-ae6d356b.pth``, scale 0.13) and ``'kadid'``
(``ckpt_kadid10k.pt``, scale 0.8) are the same network with other weights; see
:data:`MANIQA_VARIANTS`.

Network (real size):

* ViT-B/8 (timm ``vit_base_patch8_224``, built with ``pretrained=False``; its weights are the
  checkpoint's ``vit.*`` entries, whose names equal timm's); the outputs of blocks 6, 7, 8 and 9
  (0-based, before the final norm, class token dropped) are concatenated → ``(N, 784, 3072)``;
* stage 1: 2 transposed-attention blocks (attention across the 3072 channels, each token axis of
  length 784 projected by ``c_q/c_k/c_v``), 1×1 conv 3072 → 768, a "scale Swin" of 2 layers of 2
  Swin blocks (window 4, 4 heads, MLP 768, shift 2 in odd blocks) each followed by a 3×3 conv +
  ReLU, with residual ``x + scale * layer(x)``;
* stage 2: the same with 768 channels, 1×1 conv 768 → 384 and a 384-channel scale Swin;
* head: per patch a score (Linear-ReLU-Linear-ReLU) and a weight (Linear-ReLU-Linear-Sigmoid).

Test-time protocol (pyiqa 0.1.12, ``MANIQA.forward`` in eval mode):

* input ``(B, 3, H, W)`` RGB in [0, 1] is normalised to [-1, 1] (mean = std = 0.5);
* if ``min(H, W) <= 224`` the (normalised) image is resized with PyTorch bilinear
  (``align_corners=False``, no antialias) by the factor ``225 / min(H, W)``
  (``F.interpolate(scale_factor=...)``: output size ``floor(n * factor)``);
* ``test_sample = 20`` crops of 224×224 on a **deterministic grid** (pyiqa 0.1.12 uses its
  ``uniform_crop`` at test time, not random crops): ``k = floor(sqrt(20)) = 4`` gives the steps
  ``(H - 224) // k`` and ``(W - 224) // k``; positions ``(i * step_h, j * step_w)`` for
  ``i, j < ceil(sqrt(20)) = 5`` in row-major order, of which the first 20 are used (rows 0-3);
* the score is **one** weighted mean over the patches of all crops of an image:
  ``sum(w * s) / (sum(w) + 1e-8)`` over ``20 × 784`` patches (not the mean of per-crop scores).

``crops="random"`` instead draws the crop corners uniformly (like pyiqa's ``random_crop``: top
then left, each in ``[0, H - 224]``) from a ``torch.Generator`` seeded with ``seed`` for every
image, so the result is deterministic and independent of batching; it is not the paper's protocol.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import Mlp  # fc1 → exact GELU → fc2 (the released key names)
from torch import nn

from ..errors import InvalidSettingError
from ..image import ImageError
from ..io.networks import WEIGHT_FILES, freeze, read_state_dict, require_weight_file
from ..io.state_dicts import load_checked
from ..utils.logging import get_logger
from .base import Metric

logger = get_logger(__name__)

#: ``train_dataset`` → (weight key in :data:`osdface.evaluation.weights.WEIGHT_FILES`, Swin residual
#: scale, upstream file name). ``koniq`` is pyiqa 0.1.12's default ``maniqa``.
MANIQA_VARIANTS: dict[str, tuple[str, float, str]] = {
    "koniq": ("maniqa", 0.8, "ckpt_koniq10k.pt"),
    "pipal": ("maniqa_pipal", 0.13, "MANIQA_PIPAL-ae6d356b.pth"),
    "kadid": ("maniqa_kadid", 0.8, "ckpt_kadid10k.pt"),
}

#: Architecture of the released checkpoints (pyiqa / IIGROUP ``MANIQA`` defaults).
MANIQA_CONFIG: dict = {
    "embed_dim": 768,
    "img_size": 224,
    "patch_size": 8,
    "vit_depth": 12,
    "vit_num_heads": 12,
    "vit_mlp_ratio": 4.0,
    "vit_num_classes": 1000,
    "feature_blocks": (6, 7, 8, 9),
    "num_tab": 2,
    "depths": (2, 2),
    "num_heads": (4, 4),
    "window_size": 4,
    "dim_mlp": 768,
    "scale": 0.8,
}

#: Normalisation of the inputs (pyiqa ``IMAGENET_INCEPTION_MEAN/STD``, IIGROUP ``Normalize(0.5, 0.5)``).
MANIQA_MEAN = (0.5, 0.5, 0.5)
MANIQA_STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------
# Pre-processing
# ----------------------------------------------------------------------------------------------


def resize_for_crops(x: torch.Tensor, crop_size: int = 224) -> torch.Tensor:
    """Upscale ``x`` ``(B, C, H, W)`` when ``min(H, W) <= crop_size`` (otherwise return it unchanged).

    Bilinear (``align_corners=False``, no antialias) with ``scale_factor = (crop_size + 1) / min(H, W)``
    for both axes, so the output is ``floor(H * f) × floor(W * f)`` (≥ ``crop_size`` on the short side).
    """
    h, w = x.shape[-2:]
    if min(h, w) > crop_size:
        return x
    return F.interpolate(x, scale_factor=(crop_size + 1) / min(h, w), mode="bilinear")


def crop_positions(h: int, w: int, crop_size: int = 224, num: int = 20, mode: str = "grid",
                   seed: int = 0) -> list[tuple[int, int]]:
    """Top-left corners ``[(top, left)] * num`` of the crops of an ``h × w`` image (``h, w >= crop_size``).

    ``mode="grid"`` is pyiqa 0.1.12's test-time grid (see the module docstring); ``mode="random"``
    draws ``top`` then ``left`` for every crop, uniformly in ``[0, h - crop_size]`` and
    ``[0, w - crop_size]``, from a ``torch.Generator`` seeded with ``seed``.
    """
    if min(h, w) < crop_size:
        raise ImageError(f"image {h}x{w} is smaller than the {crop_size}x{crop_size} crops")
    if mode == "grid":
        k, n = int(math.sqrt(num)), math.ceil(math.sqrt(num))
        step_h, step_w = (h - crop_size) // k, (w - crop_size) // k
        return [(i * step_h, j * step_w) for i in range(n) for j in range(n)][:num]
    if mode == "random":
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num):
            top = int(torch.randint(0, h - crop_size + 1, (1,), generator=g))
            left = int(torch.randint(0, w - crop_size + 1, (1,), generator=g))
            out.append((top, left))
        return out
    raise InvalidSettingError(f"unknown crop mode {mode!r}; choose from ['grid', 'random']")


def maniqa_crops(x: torch.Tensor, crop_size: int = 224, num: int = 20, mode: str = "grid",
                 seed: int = 0) -> torch.Tensor:
    """The test-time crops of a batch: ``(B, C, H, W)`` → ``(B * num, C, crop_size, crop_size)``.

    Small images are first upscaled by :func:`resize_for_crops`. Crops of one image are consecutive
    (image-major), at :func:`crop_positions` (the same for every image of the batch).
    """
    x = resize_for_crops(x, crop_size)
    b, c, h, w = x.shape
    pos = crop_positions(h, w, crop_size, num, mode, seed)
    crops = torch.stack([x[..., t:t + crop_size, s:s + crop_size] for t, s in pos], dim=1)
    return crops.reshape(b * num, c, crop_size, crop_size)


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


class TransposedAttention(nn.Module):
    """Transposed attention block (TAB): attention between channels, with a residual.

    Input and output ``(B, C, N)`` (``N`` tokens). ``c_q/c_k/c_v`` act on the token axis; the
    ``C × C`` attention is scaled by ``N ** -0.5``. As in the original (and the released weights),
    the ``(B, C, N)`` product is transposed to ``(B, N, C)`` and then *reshaped* (not transposed
    back) to ``(B, C, N)`` before the residual.
    """

    def __init__(self, num_tokens: int):
        super().__init__()
        self.c_q = nn.Linear(num_tokens, num_tokens)
        self.c_k = nn.Linear(num_tokens, num_tokens)
        self.c_v = nn.Linear(num_tokens, num_tokens)
        self.norm_fact = num_tokens**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, c, n = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.norm_fact, dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, c, n) + x


def _windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B * nW, ws * ws, C)`` non-overlapping windows, row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _unwindows(x: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_windows`: ``(B * nW, ws * ws, C)`` → ``(B, H, W, C)``."""
    c = x.shape[-1]
    x = x.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``ws × ws`` windows with a learned relative-position bias.

    ``(B', ws², C)`` → ``(B', ws², C)``; ``mask`` ``(nW, ws², ws²)`` (0 / -100) for shifted windows.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)  # (2, ws²)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # (ws², ws², 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window_size - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]).view(-1, self.num_heads, n, n)
        attn = torch.softmax(attn, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP block on ``(B, H*W, C)`` tokens of a fixed ``H × W`` grid.

    When the grid is not larger than the window, the window shrinks to the grid and nothing is shifted.
    """

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window_size: int, shift: int,
                 dim_mlp: int):
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window_size:
            window_size, shift = min(resolution), 0
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim_mlp)
        if shift > 0:
            # label the 3 × 3 regions of the rolled grid; pairs from different regions are masked
            h, w = resolution
            label = torch.zeros(1, h, w, 1)
            bounds = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
            for i, hs in enumerate(bounds):
                for j, wsl in enumerate(bounds):
                    label[:, hs, wsl, :] = i * 3 + j
            lw = _windows(label, window_size).squeeze(-1)  # (nW, ws²)
            diff = lw[:, None, :] - lw[:, :, None]
            self.register_buffer("attn_mask", torch.where(diff != 0, -100.0, 0.0))
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h, w = self.resolution
        b, n, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = _unwindows(self.attn(_windows(y, self.window_size), mask=self.attn_mask), self.window_size, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class SwinLayer(nn.Module):
    """Swin blocks (shift 0, ``ws // 2``, 0, ...) then a 3×3 conv + ReLU; ``(B, H*W, C)`` → same."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 dim_mlp: int):
        super().__init__()
        self.resolution = resolution
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, dim_mlp)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for blk in self.blocks:
            x = blk(x)
        b, n, c = x.shape
        x = F.relu(self.conv(x.transpose(1, 2).reshape(b, c, *self.resolution)))
        return x.flatten(2).transpose(1, 2)


class ScaleSwin(nn.Module):
    """MANIQA's scale Swin: ``x ← x + scale · layer(x)`` for every :class:`SwinLayer`; ``(B, C, H, W)`` → same.

    ``downsample`` is a parameter of the released checkpoints that the forward pass never uses.
    """

    def __init__(self, dim: int, resolution: tuple[int, int], depths, num_heads, window_size: int, dim_mlp: int,
                 scale: float):
        super().__init__()
        self.scale = scale
        self.resolution = resolution
        self.downsample = nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1)  # unused (checkpoint layout)
        self.layers = nn.ModuleList(
            SwinLayer(dim, resolution, d, h, window_size, dim_mlp) for d, h in zip(depths, num_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x.transpose(1, 2).reshape(b, c, *self.resolution)


class MANIQANet(nn.Module):
    """The MANIQA network on normalised ``img_size²`` crops; module names = the released checkpoints'.

    Args (defaults = :data:`MANIQA_CONFIG`, the released size; smaller values give tiny test nets):
        embed_dim: ViT width (= MANIQA's ``embed_dim``).
        img_size, patch_size: crop size and ViT patch size (token grid ``img_size // patch_size``).
        vit_depth, vit_num_heads, vit_mlp_ratio, vit_num_classes: the timm ViT (``vit_base_patch8_224``
            overridden with these); its classifier head is never used but is part of the checkpoint.
        feature_blocks: the ViT blocks whose outputs are concatenated.
        num_tab, depths, num_heads, window_size, dim_mlp, scale: TAB count per stage and scale-Swin settings.

    ``forward(x)``: ``(N, 3, img_size, img_size)`` float normalised to [-1, 1] → ``(scores, weights)``,
    each ``(N, L)`` with ``L = (img_size // patch_size) ** 2`` per-patch values (weights in (0, 1)).
    """

    def __init__(self, embed_dim: int = 768, img_size: int = 224, patch_size: int = 8, vit_depth: int = 12,
                 vit_num_heads: int = 12, vit_mlp_ratio: float = 4.0, vit_num_classes: int = 1000,
                 feature_blocks=(6, 7, 8, 9), num_tab: int = 2, depths=(2, 2), num_heads=(4, 4),
                 window_size: int = 4, dim_mlp: int = 768, scale: float = 0.8):
        super().__init__()
        import timm

        self.img_size, self.grid = img_size, img_size // patch_size
        self.feature_blocks = tuple(feature_blocks)
        if max(self.feature_blocks) >= vit_depth:
            raise InvalidSettingError(f"feature_blocks {self.feature_blocks} need a ViT deeper than {vit_depth}")
        self.vit = timm.create_model(
            "vit_base_patch8_224", pretrained=False, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
            depth=vit_depth, num_heads=vit_num_heads, mlp_ratio=vit_mlp_ratio, num_classes=vit_num_classes)
        tokens, res = self.grid**2, (self.grid, self.grid)
        nf = len(self.feature_blocks)
        self.tablock1 = nn.ModuleList(TransposedAttention(tokens) for _ in range(num_tab))
        self.conv1 = nn.Conv2d(embed_dim * nf, embed_dim, 1, 1, 0)
        self.swintransformer1 = ScaleSwin(embed_dim, res, depths, num_heads, window_size, dim_mlp, scale)
        self.tablock2 = nn.ModuleList(TransposedAttention(tokens) for _ in range(num_tab))
        self.conv2 = nn.Conv2d(embed_dim, embed_dim // 2, 1, 1, 0)
        self.swintransformer2 = ScaleSwin(embed_dim // 2, res, depths, num_heads, window_size, dim_mlp, scale)
        half = embed_dim // 2
        self.fc_score = nn.Sequential(nn.Linear(half, half), nn.ReLU(), nn.Dropout(0.1), nn.Linear(half, 1), nn.ReLU())
        self.fc_weight = nn.Sequential(nn.Linear(half, half), nn.ReLU(), nn.Dropout(0.1), nn.Linear(half, 1),
                                       nn.Sigmoid())

    def vit_features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated outputs of ``feature_blocks`` without the class token: ``(N, L, embed_dim * 4)``."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        feats = []
        for i, blk in enumerate(vit.blocks[: max(self.feature_blocks) + 1]):
            x = blk(x)
            if i in self.feature_blocks:
                feats.append(x[:, vit.num_prefix_tokens:])
        return torch.cat(feats, dim=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        n, g = x.shape[0], self.grid
        x = self.vit_features(x).transpose(1, 2)  # (N, 4C, L)
        for tab in self.tablock1:
            x = tab(x)
        x = self.swintransformer1(self.conv1(x.reshape(n, -1, g, g)))
        x = x.flatten(2)
        for tab in self.tablock2:
            x = tab(x)
        x = self.swintransformer2(self.conv2(x.reshape(n, -1, g, g)))
        x = x.flatten(2).transpose(1, 2)  # (N, L, C/2)
        return self.fc_score(x).squeeze(-1), self.fc_weight(x).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def load_maniqa_weights(net: MANIQANet, path: str | os.PathLike) -> MANIQANet:
    """Load a released MANIQA checkpoint into ``net`` after a strict key/shape check.

    Raises:
        ModelFileError: naming ``path`` and the first missing / unexpected / wrongly shaped keys.
    """
    path = Path(path)
    load_checked(net, read_state_dict(path), path,
                 "a MANIQA checkpoint of this architecture")
    logger.info("MANIQA weights loaded from %s", path)
    return net


# ----------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------


class MANIQAMetric(Metric):
    """MANIQA score (no reference, higher is better), pyiqa 0.1.12 ``maniqa`` protocol.

    ``metric(pred)``: ``(B, 3, H, W)`` RGB float in [0, 1] → ``(B,)`` float64 scores (on the scale of
    the variant's training labels). Images of one batch share their size; any ``H × W`` is accepted.

    Args:
        device: torch device of the network.
        weights_dir: metrics weights folder (default ``$OSDFACE_HOME/metrics``).
        pretrained: ``True`` loads the variant's released file (key ``MANIQA_VARIANTS[train_dataset][0]``);
            ``False`` builds the same network with random weights seeded by ``seed`` and reads no file.
        train_dataset: ``"koniq"`` (pyiqa's default ``maniqa``, the paper's), ``"pipal"`` or ``"kadid"``.
        test_sample: number of crops per image (pyiqa: 20).
        crops: ``"grid"`` (pyiqa 0.1.12's test-time crops, default) or ``"random"`` (seeded, see below).
        seed: seed of the ``torch.Generator`` that draws the ``"random"`` crop corners (re-seeded for every
            image, so scores are deterministic and do not depend on batching) and of the random weights
            when ``pretrained=False``. Unused by ``"grid"`` crops.
        crop_batch: crops per network forward (memory bound; the result does not depend on it).
        arch: overrides of :data:`MANIQA_CONFIG` (tiny test networks); ``scale`` defaults to the variant's.
        dtype: floating dtype of the network (``torch.float32`` as upstream).
    """

    name, full_reference, lower_better = "maniqa", False, False

    def __init__(self, device="cpu", weights_dir=None, pretrained: bool = True, train_dataset: str = "koniq",
                 test_sample: int = 20, crops: str = "grid", seed: int = 0, crop_batch: int = 20,
                 arch: dict | None = None, dtype: torch.dtype = torch.float32, **_):
        super().__init__(device)
        if train_dataset not in MANIQA_VARIANTS:
            raise InvalidSettingError(f"unknown MANIQA train_dataset {train_dataset!r}; choose from {list(MANIQA_VARIANTS)}")
        if crops not in ("grid", "random"):
            raise InvalidSettingError(f"unknown crops {crops!r}; choose from ['grid', 'random']")
        key, scale, upstream = MANIQA_VARIANTS[train_dataset]
        cfg = {**MANIQA_CONFIG, "scale": scale, **(arch or {})}
        self.train_dataset, self.test_sample, self.crops, self.seed = train_dataset, test_sample, crops, seed
        self.crop_batch, self.crop_size = max(1, int(crop_batch)), cfg["img_size"]
        if pretrained:
            if key not in WEIGHT_FILES:
                raise InvalidSettingError(f"maniqa(train_dataset={train_dataset!r}) needs a weight entry {key!r} "
                                 f"(upstream file {upstream}) in osdface.evaluation.weights.WEIGHT_FILES")
            path = require_weight_file(key, weights_dir)
            with torch.device("meta"):  # every tensor comes from the file: skip the random init
                net = MANIQANet(**cfg)
            if set(dict(net.named_buffers())) <= set(net.state_dict()):
                net.to_empty(device="cpu")
            else:  # a non-persistent buffer would stay uninitialised: build for real
                net = MANIQANet(**cfg)
            load_maniqa_weights(net, path)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = MANIQANet(**cfg)
        self.net = freeze(net.to(device=self.device, dtype=dtype))

    def compute(self, pred: torch.Tensor, gt=None) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → ``(B,)`` scores (network dtype)."""
        dtype = next(self.net.parameters()).dtype
        x = pred.to(device=self.device, dtype=dtype)
        mean = torch.tensor(MANIQA_MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(MANIQA_STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
        crops = maniqa_crops(x, self.crop_size, self.test_sample, self.crops, self.seed)
        outs = [self.net(chunk) for chunk in crops.split(self.crop_batch)]
        s = torch.cat([o[0] for o in outs]).reshape(pred.shape[0], -1)
        w = torch.cat([o[1] for o in outs]).reshape(pred.shape[0], -1)
        return (w * s).sum(dim=-1) / (w.sum(dim=-1) + 1e-8)
