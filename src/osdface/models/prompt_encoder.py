"""Visual Representation Embedder (VRE) and prompt adapter: LQ face → 77 visual-prompt tokens.

The VRE (spec §2.1–2.3) is the LQ encoder + LQ dictionary of stage 1: a VQ encoder maps the
face to a ``16×16×512`` feature grid; each grid position is matched to its nearest dictionary
entry; the *distinct* entries, ordered by how well they match, become the prompt tokens
(zero rows when there are fewer distinct entries than tokens). The prompt adapter (§2.5) maps
each token to the UNet's cross-attention width.

The official selection loops in Python per sample and crashes for batch > 1; here it is
vectorised over the batch (:func:`select_prompt_tokens`) and equal to the per-sample rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .vq import MultiHeadEncoder

InputNormalization = Literal["official", "standard"]


def code_distances(h: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances between grid features and dictionary entries.

    Args:
        h: ``(B, C, H, W)`` features (output of ``quant_conv``).
        codebook: ``(N, C)`` dictionary.

    Returns:
        ``(B, H*W, N)`` distances ``|z|² + |e|² − 2 z·e``, computed in at least float32 (the
        official code evaluates this in the run dtype, which can overflow or tie in fp16).
    """
    dtype = torch.promote_types(h.dtype, torch.float32)
    b, c = h.shape[:2]
    z = h.to(dtype).permute(0, 2, 3, 1).reshape(b, -1, c)  # (B, HW, C), row-major over the grid
    e = codebook.to(dtype)
    return torch.sum(z**2, dim=2, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.matmul(z, e.t())


def select_prompt_tokens(
    distances: torch.Tensor, codebook: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The OSDFace token rule, batched (spec §2.3).

    Per sample: nearest code of each position; positions sorted by their nearest-code distance
    (ascending); walk that order and keep each code the first time it appears; stop at
    ``num_tokens`` codes; pad with zero vectors.

    Args:
        distances: ``(B, K, N)`` position-to-code distances.
        codebook: ``(N, C)`` dictionary.
        num_tokens: number of prompt tokens T.

    Returns:
        tokens ``(B, T, C)`` (codebook dtype), and code indices ``(B, T)`` (int64, -1 for padding).
    """
    b, k, n = distances.shape
    dmin, codes = distances.min(dim=2)  # (B, K): best distance and code per position
    order = torch.sort(dmin, dim=1, stable=True).indices  # (B, K): positions, best first
    codes_sorted = torch.gather(codes, 1, order)  # (B, K)
    rank = torch.arange(k, device=codes.device).expand(b, k)
    # first rank at which each code appears (k = never): first-occurrence de-duplication
    first = torch.full((b, n), k, dtype=torch.long, device=codes.device)
    first.scatter_reduce_(1, codes_sorted, rank, reduce="amin", include_self=True)
    first_sorted, code_order = torch.sort(first, dim=1, stable=True)  # (B, N): codes by first rank
    take = min(num_tokens, n)
    idx = code_order[:, :take]  # (B, take)
    valid = first_sorted[:, :take] < k  # (B, take)
    idx = torch.where(valid, idx, torch.full_like(idx, -1))
    if take < num_tokens:  # a dictionary smaller than the prompt: always zero-filled at the end
        idx = torch.cat([idx, idx.new_full((b, num_tokens - take), -1)], dim=1)
    tokens = codebook[idx.clamp(min=0)] * (idx >= 0).unsqueeze(-1).to(codebook.dtype)  # (B, T, C)
    return tokens, idx


def vre_preprocess(x: torch.Tensor, resolution: int, input_normalization: InputNormalization) -> torch.Tensor:
    """Model-space image → VQ-encoder input: bilinear resize to ``resolution`` (``align_corners=False``,
    as the official wrapper), then the configured normalisation (``"official"``: a second
    ``(x − 0.5) / 0.5``, spec §2.1)."""
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    if input_normalization == "official":
        x = (x - 0.5) / 0.5
    return x


def infer_vre_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Recover the VRE architecture from its (prefix-stripped) state dict.

    Widths, depth, dictionary size and attention placement are read from tensor shapes. The input
    resolution follows the official convention that attention sits at the 16×16 level
    (``resolution = 16 · 2^level``); this gives 512 for the release. ``head_size`` and
    ``num_tokens`` cannot be seen in the weights and keep their defaults (1, 77).
    """
    try:
        emb = state_dict["quantize.embedding.weight"]
        conv_in = state_dict["encoder.conv_in.weight"]
        z_channels = state_dict["encoder.conv_out.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a VRE state dict: missing {e.args[0]}") from None
    ch = conv_in.shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down."))
    ch_mult = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    num_res_blocks = 1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down.0.block."))
    attn_levels = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down.") and ".attn." in k})
    resolution = 16 * 2 ** attn_levels[0] if attn_levels else 16 * 2 ** (levels - 1)
    return dict(
        n_embed=emb.shape[0], embed_dim=emb.shape[1], ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(resolution // 2**i for i in attn_levels), in_channels=conv_in.shape[1],
        resolution=resolution, z_channels=z_channels,
        enable_mid=any(k.startswith("encoder.mid.") for k in state_dict),
    )


class VisualPromptEncoder(ModelMixin, ConfigMixin):
    """The VRE: aligned face ``(B, 3, H, W)`` in [-1, 1] → prompt tokens ``(B, num_tokens, embed_dim)``.

    The default configuration is the released OSDFace VRE (29.17 M parameters).

    Args:
        n_embed: dictionary size N.
        embed_dim: dictionary entry width C.
        ch, ch_mult, num_res_blocks, attn_resolutions, dropout, in_channels, resolution,
            z_channels, enable_mid, head_size: VQ-encoder architecture (spec §2.2).
        num_tokens: prompt length T (77).
        input_normalization: ``"official"`` reproduces the release, whose wrapper normalises an
            already [-1, 1] input a second time (the encoder sees ``2x − 1`` ∈ [-3, 1]); the
            released LoRA and adapter were trained at that operating point. ``"standard"`` feeds
            the [-1, 1] image unchanged (for VREs trained from scratch that way).
    """

    @register_to_config
    def __init__(
        self,
        n_embed: int = 1024,
        embed_dim: int = 512,
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
        num_tokens: int = 77,
        input_normalization: InputNormalization = "official",
    ):
        super().__init__()
        if input_normalization not in ("official", "standard"):
            raise ValueError(f"input_normalization must be 'official' or 'standard', got {input_normalization!r}")
        self.encoder = MultiHeadEncoder(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            dropout=dropout,
            in_channels=in_channels,
            resolution=resolution,
            z_channels=z_channels,
            enable_mid=enable_mid,
            head_size=head_size,
        )
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(n_embed, embed_dim)
        self.quantize.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    @property
    def codebook(self) -> torch.Tensor:
        """The ``(N, C)`` dictionary."""
        return self.quantize.embedding.weight

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space image → encoder input (see :func:`vre_preprocess`)."""
        return vre_preprocess(x, self.config.resolution, self.config.input_normalization)

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → pre-quantisation features ``(B, embed_dim, r, r)``."""
        return self.quant_conv(self.encoder(self.preprocess(x)))

    def forward(self, x: torch.Tensor, return_indices: bool = False):
        """Face ``(B, 3, H, W)`` in [-1, 1] → tokens ``(B, T, embed_dim)`` (and code indices ``(B, T)``)."""
        h = self.encode_features(x)
        tokens, idx = select_prompt_tokens(code_distances(h, self.codebook), self.codebook, self.config.num_tokens)
        tokens = tokens.to(h.dtype)
        return (tokens, idx) if return_indices else tokens


class PromptAdapter(ModelMixin, ConfigMixin):
    """Per-token MLP ``SiLU(W2 · SiLU(W1 · v + b1) + b2)`` (official ``TwoLayerConv1x1``, spec §2.5).

    Implemented with kernel-1 ``Conv1d`` over the token axis like the original, so the official
    ``embedding_change_weights.pth`` loads strictly. Note the trailing SiLU: outputs are ≥ −0.2785.

    Args:
        in_channels: token width (VRE ``embed_dim``).
        out_channels: UNet cross-attention width (1024 for SD 2.1).
    """

    @register_to_config
    def __init__(self, in_channels: int = 512, out_channels: int = 1024):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, in_channels // 2, kernel_size=1)
        self.conv2 = nn.Conv1d(in_channels // 2, out_channels, kernel_size=1)
        self.silu = nn.SiLU()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, in_channels)`` → ``(B, T, out_channels)``."""
        x = tokens.permute(0, 2, 1)  # (B, C, T)
        x = self.silu(self.conv2(self.silu(self.conv1(x))))
        return x.permute(0, 2, 1)
