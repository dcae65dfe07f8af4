"""Building blocks of the VRE's VQ encoder (the taming-transformers / DAEFR "MultiHeadEncoder").

Ported from the OSDFace release (``lq_embed/vqvae.py``), which follows DAEFR
(https://github.com/LIAGM/DAEFR) and taming-transformers (MIT licence). Module and parameter
names are kept exactly so that the official ``associate_2.ckpt`` loads key for key
(``encoder.down.0.block.0.norm1.weight`` ...). Operation order is kept too (e.g. the attention
scale is applied to ``q`` before the matmul) so that float results match the original.

A mirrored decoder (DAEFR ``MultiHeadDecoder``) is provided for stage-1 training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)``, written as in the original (not ``F.silu``) to keep its rounding."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """32-group GroupNorm with eps 1e-6 (taming's ``Normalize``)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN → swish → conv3x3 → GN → swish → dropout → conv3x3, plus a residual (1x1 ``nin_shortcut``
    when the channel count changes). No time embedding."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class MultiHeadAttnBlock(nn.Module):
    """Spatial self-attention over all ``H*W`` positions with 1x1-conv q/k/v.

    ``norm2`` exists only for the (unused) cross-attention variant; it is kept so the official
    state dict loads strictly.
    """

    def __init__(self, in_channels: int, head_size: int = 1):
        super().__init__()
        if in_channels % head_size:
            raise ValueError(f"in_channels={in_channels} must be divisible by head_size={head_size}")
        self.head_size = head_size
        self.att_size = in_channels // head_size
        self.norm1 = group_norm(in_channels)
        self.norm2 = group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm1(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        # (B, C, H, W) -> (B, head, HW, att)
        q = q.reshape(b, self.head_size, self.att_size, h * w).permute(0, 1, 3, 2)
        v = v.reshape(b, self.head_size, self.att_size, h * w).permute(0, 1, 3, 2)
        k = k.reshape(b, self.head_size, self.att_size, h * w)  # (B, head, att, HW)
        q = q * (int(self.att_size) ** (-0.5))
        attn = torch.softmax(torch.matmul(q, k), dim=3)  # (B, head, HW, HW)
        out = attn.matmul(v)  # (B, head, HW, att)
        out = out.transpose(1, 2).contiguous().view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (halves H and W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest ×2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MultiHeadEncoder(nn.Module):
    """Image ``(B, in_channels, R, R)`` → features ``(B, z_channels, R / 2^(L-1), R / 2^(L-1))``."""

    def __init__(
        self,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2, 2, 4, 8),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        in_channels: int = 3,
        resolution: int = 512,
        z_channels: int = 512,
        enable_mid: bool = True,
        head_size: int = 1,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.enable_mid = enable_mid
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(MultiHeadAttnBlock(block_in, head_size))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        if enable_mid:
            self.mid = nn.Module()
            self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
            self.mid.attn_1 = MultiHeadAttnBlock(block_in, head_size)
            self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        if self.enable_mid:
            h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class MultiHeadDecoder(nn.Module):
    """Features ``(B, z_channels, r, r)`` → image ``(B, out_ch, R, R)``; mirror of the encoder
    with ``num_res_blocks + 1`` blocks per level (DAEFR/taming decoder)."""

    def __init__(
        self,
        ch: int = 64,
        out_ch: int = 3,
        ch_mult: Sequence[int] = (1, 2, 2, 2, 4, 8),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        resolution: int = 512,
        z_channels: int = 512,
        enable_mid: bool = True,
        head_size: int = 1,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.enable_mid = enable_mid
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        if enable_mid:
            self.mid = nn.Module()
            self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
            self.mid.attn_1 = MultiHeadAttnBlock(block_in, head_size)
            self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(MultiHeadAttnBlock(block_in, head_size))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        if self.enable_mid:
            h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
