"""Visual Representation Embedder (VRE) and prompt adapter: LQ face → 77 visual-prompt tokens.

The VRE (docs/method.md §2.1–2.3) is the LQ encoder + LQ dictionary of stage 1: a VQ encoder maps the
face to a ``16×16×512`` feature grid; each grid position is matched to its nearest dictionary
entry; the *distinct* entries, ordered by how well they match, become the prompt tokens
(zero rows when there are fewer distinct entries than tokens). The prompt adapter (§2.5) maps
each token to the UNet's cross-attention width.

The official selection loops in Python per sample and crashes for batch > 1; here it is
vectorised over the batch (:func:`select_prompt_tokens`), equal to the per-sample rule, and built
from fixed-shape ops that export to ONNX (no sort, top-k or scatter-reduce).
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


def _precedence(dmin: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` keys → ``(B, K, K)`` bool, ``[b, i, j]`` true when position j comes before position i.

    The order is the one of a stable ascending sort (``torch.sort(stable=True)``): a smaller key
    first, equal keys by position index; NaN after every number (``+inf`` included) and equal to
    NaN; ``-0.0`` equal to ``0.0``. It is a strict total order, so the rank of position i (its place
    in the sorted order) is the number of positions before it. Only elementwise comparisons and
    logical ops, so it exports to ONNX with fixed shapes (no Sort/TopK, whose ties are not stable).
    """
    k = dmin.shape[1]
    pos = torch.arange(k, device=dmin.device)
    di, dj = dmin.unsqueeze(2), dmin.unsqueeze(1)  # (B, K, 1) for i, (B, 1, K) for j
    nan_i, nan_j = torch.isnan(di), torch.isnan(dj)
    less = (dj < di) | (nan_i & ~nan_j)
    equal = (dj == di) | (nan_i & nan_j)
    return less | (equal & (pos.unsqueeze(0) < pos.unsqueeze(1)))  # (B, K, K)


def select_prompt_tokens(
    distances: torch.Tensor, codebook: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The OSDFace token rule, batched (docs/method.md §2.3).

    Per sample: nearest code of each position (the lowest code index on ties); positions sorted
    by their nearest-code distance (ascending, ties by position index: a stable sort); walk that
    order and keep each code the first time it appears; stop at ``num_tokens`` codes; pad with
    zero vectors.

    Written with fixed shapes and ONNX-friendly ops only (comparisons, logical ops, sums,
    gathers; no sort, top-k, scatter-reduce, nonzero or unique) so that it exports: with the
    ``(B, K, K)`` precedence relation ``P`` of :func:`_precedence`, position i is kept when no
    position before it has the same code, its slot is the number of kept positions before it,
    and slot s takes the code of the kept position whose slot is s (``-1`` when there is none).

    Args:
        distances: ``(B, K, N)`` position-to-code distances.
        codebook: ``(N, C)`` dictionary.
        num_tokens: number of prompt tokens T.

    Returns:
        tokens ``(B, T, C)`` (codebook dtype), and code indices ``(B, T)`` (int64, -1 for padding).
    """
    dmin, codes = distances.min(dim=2)  # (B, K): best distance and code (first minimum) per position
    before = _precedence(dmin)  # (B, K, K): [b, i, j] = j before i
    same = codes.unsqueeze(2) == codes.unsqueeze(1)  # (B, K, K): [b, i, j] = same code at i and j
    keep = (before & same).sum(dim=2) == 0  # (B, K): first occurrence of its code in the walk
    slot = (before & keep.unsqueeze(1)).sum(dim=2)  # (B, K): kept positions before i
    slots = torch.arange(num_tokens, device=codes.device)  # (T,)
    hit = keep.unsqueeze(1) & (slot.unsqueeze(1) == slots.view(1, -1, 1))  # (B, T, K): at most one per row
    found = hit.sum(dim=2) > 0  # (B, T)
    idx = torch.where(hit, codes.unsqueeze(1), torch.zeros_like(codes).unsqueeze(1)).sum(dim=2)  # (B, T)
    idx = torch.where(found, idx, torch.full_like(idx, -1))
    tokens = codebook[idx.clamp(min=0)] * (idx >= 0).unsqueeze(-1).to(codebook.dtype)  # (B, T, C)
    return tokens, idx


def vre_preprocess(x: torch.Tensor, resolution: int, input_normalization: InputNormalization) -> torch.Tensor:
    """Model-space image → VQ-encoder input: bilinear resize to ``resolution`` (``align_corners=False``,
    as the official wrapper), then the configured normalisation (``"official"``: a second
    ``(x − 0.5) / 0.5``, docs/method.md §2.1)."""
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    if input_normalization == "official":
        x = (x - 0.5) / 0.5
    return x


#: Plausibility bounds for a VRE architecture read back from a checkpoint's tensor shapes
#: (:func:`infer_vre_config`), checked before anything is built. The release (docs/method.md §2.2) has a
#: 1024 × 512 dictionary, widths 64…512 (``ch=64``, ``ch_mult`` up to 8, ``z_channels=512``),
#: 6 levels, 2 ResBlocks per level and RGB input; the tiny test VRE (``osdface.testing``) has
#: 16 × 32 and widths 32…64. The bounds are far above any VRE our training produces and refuse
#: absurd claims (a 24-million-entry dictionary, say). Keys: ``n_embed`` (dictionary entries),
#: ``embed_dim`` (entry width), ``channels`` (any encoder width), ``in_channels``, ``levels``
#: (``len(ch_mult)``; the input resolution is ``16 · 2^(attention level)``), ``num_res_blocks``.
VRE_BOUNDS = {
    "n_embed": 65536,
    "embed_dim": 4096,
    "channels": 4096,
    "in_channels": 16,
    "levels": 8,
    "num_res_blocks": 16,
}


def _shape(state_dict: dict[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    try:
        t = state_dict[key]
    except KeyError:
        raise ValueError(f"not a VRE state dict: missing {key}") from None
    shape = tuple(getattr(t, "shape", ()))
    if len(shape) != ndim:
        raise ValueError(f"'{key}' has shape {shape}; a {ndim}-d tensor is expected")
    return shape


def _bounded(value: int, bound_key: str, key: str, shape: tuple[int, ...], what: str) -> int:
    bound = VRE_BOUNDS[bound_key]
    if not 1 <= value <= bound:
        raise ValueError(
            f"'{key}' has shape {shape}: {value} {what} is outside 1..{bound} (VRE_BOUNDS['{bound_key}'])"
        )
    return value


def _indices(state_dict: dict[str, torch.Tensor], prefix: str, position: int) -> set[int]:
    """The integers at dot-position ``position`` of the keys starting with ``prefix``."""
    out = set()
    for k in state_dict:
        if k.startswith(prefix):
            parts = k.split(".")
            if len(parts) <= position or not parts[position].isdigit() or len(parts[position]) > 6:
                raise ValueError(f"unexpected key '{k}' in a VRE state dict")
            out.add(int(parts[position]))
    return out


def infer_vre_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Recover the VRE architecture from its (prefix-stripped) state dict.

    Widths, depth, dictionary size and attention placement are read from tensor shapes and checked
    against :data:`VRE_BOUNDS` (nothing is allocated here). The input resolution follows the
    official convention that attention sits at the 16×16 level (``resolution = 16 · 2^level``);
    this gives 512 for the release. ``head_size`` and ``num_tokens`` cannot be seen in the weights
    and keep their defaults (1, 77).

    Raises:
        ValueError: a key is missing, a shape has the wrong rank, or a size is outside
            :data:`VRE_BOUNDS`; the message names the key, its shape and the bound.
    """
    emb_key, in_key, out_key = "quantize.embedding.weight", "encoder.conv_in.weight", "encoder.conv_out.weight"
    emb, conv_in, conv_out = _shape(state_dict, emb_key, 2), _shape(state_dict, in_key, 4), _shape(state_dict, out_key, 4)
    n_embed = _bounded(emb[0], "n_embed", emb_key, emb, "dictionary entries")
    embed_dim = _bounded(emb[1], "embed_dim", emb_key, emb, "entry width")
    ch = _bounded(conv_in[0], "channels", in_key, conv_in, "channels")
    in_channels = _bounded(conv_in[1], "in_channels", in_key, conv_in, "input channels")
    z_channels = _bounded(conv_out[0], "channels", out_key, conv_out, "channels")
    down = _indices(state_dict, "encoder.down.", 2)
    if not down:
        raise ValueError("not a VRE state dict: no encoder.down.* keys")
    levels = 1 + max(down)
    if levels > VRE_BOUNDS["levels"]:
        raise ValueError(f"'encoder.down.{levels - 1}.*' means {levels} levels, over the bound of "
                         f"{VRE_BOUNDS['levels']} (VRE_BOUNDS['levels'])")
    ch_mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        shape = _shape(state_dict, key, 4)
        width = _bounded(shape[0], "channels", key, shape, "channels")
        if width % ch:
            raise ValueError(f"'{key}' has shape {shape}: {width} channels is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    blocks = _indices(state_dict, "encoder.down.0.block.", 4)
    num_res_blocks = 1 + max(blocks) if blocks else 0
    if not 1 <= num_res_blocks <= VRE_BOUNDS["num_res_blocks"]:
        raise ValueError(f"'encoder.down.0.block.*' means {num_res_blocks} ResBlocks per level, outside "
                         f"1..{VRE_BOUNDS['num_res_blocks']} (VRE_BOUNDS['num_res_blocks'])")
    attn_levels = sorted(i for i in down if any(k.startswith(f"encoder.down.{i}.attn.") for k in state_dict))
    resolution = 16 * 2 ** attn_levels[0] if attn_levels else 16 * 2 ** (levels - 1)
    return dict(
        n_embed=n_embed, embed_dim=embed_dim, ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(resolution // 2**i for i in attn_levels), in_channels=in_channels,
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
            z_channels, enable_mid, head_size: VQ-encoder architecture (docs/method.md §2.2).
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
    """Per-token MLP ``SiLU(W2 · SiLU(W1 · v + b1) + b2)`` (official ``TwoLayerConv1x1``, docs/method.md §2.5).

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
