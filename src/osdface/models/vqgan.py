"""VQ autoencoders (VQ-GAN generators) for stage 1: the HQ and LQ branches of docs/method.md §5.

Each branch is ``encoder → quant_conv → nearest-code quantiser → post_quant_conv → decoder``
(taming-transformers / DAEFR ``VQAutoEncoder``; MIT licence). The encoder, ``quant_conv`` and
``quantize.embedding`` use exactly the key layout of :class:`~osdface.models.VisualPromptEncoder`
(and of the official ``associate_2.ckpt`` under ``vqvae_LQ.``), so exporting the LQ branch as the
VRE is a key filter (:meth:`VQAutoencoder.to_visual_prompt_encoder`).

The quantiser returns the raw nearest codes and the straight-through output; the VQ *loss*
(taming form, β on the codebook term) lives in :mod:`osdface.losses.vq`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .prompt_encoder import VisualPromptEncoder, code_distances, vre_preprocess
from .vq import MultiHeadAttnBlock, MultiHeadDecoder, MultiHeadEncoder

#: keys shared with :class:`VisualPromptEncoder` (the VRE = LQ encoder + LQ dictionary).
VRE_KEY_PREFIXES = ("encoder.", "quant_conv.", "quantize.embedding.")


@dataclass
class QuantizerOutput:
    """Result of :class:`VectorQuantizer`.

    Attributes:
        z_q: ``(B, C, H, W)`` straight-through quantised features (value of the codes, gradient
            of ``z``).
        codes: ``(B, C, H, W)`` the selected dictionary vectors (gradient reaches the dictionary).
        indices: ``(B, H, W)`` int64 code indices.
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    indices: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour (squared L2) quantiser with a ``(n_embed, embed_dim)`` dictionary.

    The attribute is called ``embedding`` as in taming/DAEFR so state-dict keys are
    ``quantize.embedding.weight``.
    """

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """``z``: ``(B, C, H, W)`` pre-quantisation features."""
        b, _, h, w = z.shape
        with torch.no_grad():
            idx = code_distances(z.detach(), self.embedding.weight).argmin(dim=2)  # (B, HW)
        codes = self.embedding(idx).view(b, h, w, -1).permute(0, 3, 1, 2).to(z.dtype)  # (B, C, H, W)
        z_q = z + (codes - z).detach()  # straight-through estimator
        return QuantizerOutput(z_q=z_q, codes=codes, indices=idx.view(b, h, w))


@dataclass
class VQAutoencoderOutput:
    """Result of :meth:`VQAutoencoder.forward`.

    Attributes:
        recon: ``(B, out_channels, R, R)`` reconstruction, model space (≈ [-1, 1], not clamped).
        h: ``(B, embed_dim, r, r)`` pre-quantisation features (``quant_conv`` output).
        codes: ``(B, embed_dim, r, r)`` selected dictionary vectors (for the VQ loss).
        indices: ``(B, r, r)`` code indices.
    """

    recon: torch.Tensor
    h: torch.Tensor
    codes: torch.Tensor
    indices: torch.Tensor


class VQAutoencoder(ModelMixin, ConfigMixin):
    """A VQ autoencoder (the generator of one stage-1 VQ-GAN branch).

    Default configuration: the released VRE encoder (docs/method.md §2.2) plus the mirrored DAEFR decoder
    (docs/method.md §5.3): 1024 × 512 dictionary, 16 × 16 latent grid at 512².

    Args:
        n_embed, embed_dim: dictionary size and entry width.
        ch, ch_mult, num_res_blocks, attn_resolutions, dropout, in_channels, resolution,
            z_channels, enable_mid, head_size: encoder/decoder architecture (shared).
        out_channels: decoder output channels.
        input_normalization: as :class:`VisualPromptEncoder`: ``"official"`` feeds the encoder
            ``2x − 1`` for a model-space ``x`` (the released VRE's operating point, docs/method.md §2.1);
            ``"standard"`` feeds ``x`` unchanged. The decoder always reconstructs ``x``.
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
        out_channels: int = 3,
        resolution: int = 512,
        z_channels: int = 512,
        enable_mid: bool = True,
        head_size: int = 1,
        input_normalization: Literal["official", "standard"] = "official",
    ):
        super().__init__()
        if input_normalization not in ("official", "standard"):
            raise ValueError(f"input_normalization must be 'official' or 'standard', got {input_normalization!r}")
        arch = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                    attn_resolutions=tuple(attn_resolutions), dropout=dropout, resolution=resolution,
                    z_channels=z_channels, enable_mid=enable_mid, head_size=head_size)
        self.encoder = MultiHeadEncoder(in_channels=in_channels, **arch)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = MultiHeadDecoder(out_ch=out_channels, **arch)
        # The attention blocks' ``norm2`` only serves the (never used) cross-attention variant; it
        # stays in the state dict for the official key layout but gets no gradient, so freeze it
        # (DDP would otherwise wait for its gradients).
        for module in self.modules():
            if isinstance(module, MultiHeadAttnBlock):
                module.norm2.requires_grad_(False)

    @property
    def codebook(self) -> torch.Tensor:
        """The ``(n_embed, embed_dim)`` dictionary."""
        return self.quantize.embedding.weight

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space image → encoder input; the same function as :meth:`VisualPromptEncoder.preprocess`."""
        return vre_preprocess(x, self.config.resolution, self.config.input_normalization)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, R, R)`` in [-1, 1] → pre-quantisation features ``(B, embed_dim, r, r)``."""
        return self.quant_conv(self.encoder(self.preprocess(x)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """``(B, embed_dim, r, r)`` → image ``(B, out_channels, R, R)`` (model space)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> VQAutoencoderOutput:
        """Encode, quantise (straight-through) and decode ``x`` ``(B, 3, R, R)`` in [-1, 1]."""
        h = self.encode(x)
        q = self.quantize(h)
        return VQAutoencoderOutput(recon=self.decode(q.z_q), h=h, codes=q.codes, indices=q.indices)

    # ----------------------------------------------------------------------------- export
    def vre_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a :class:`VisualPromptEncoder` needs (encoder, quant_conv, dictionary)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(VRE_KEY_PREFIXES)}

    def to_visual_prompt_encoder(self, num_tokens: int = 77) -> VisualPromptEncoder:
        """Build the VRE (this branch's encoder + dictionary) with the same architecture and normalisation."""
        c = self.config
        if c.in_channels != 3:
            raise ValueError("a VRE needs a 3-channel encoder")
        vre = VisualPromptEncoder(
            n_embed=c.n_embed, embed_dim=c.embed_dim, ch=c.ch, ch_mult=tuple(c.ch_mult),
            num_res_blocks=c.num_res_blocks, attn_resolutions=tuple(c.attn_resolutions), dropout=c.dropout,
            in_channels=c.in_channels, resolution=c.resolution, z_channels=c.z_channels,
            enable_mid=c.enable_mid, head_size=c.head_size, num_tokens=num_tokens,
            input_normalization=c.input_normalization,
        )
        sd = {k: v.detach().clone().float() for k, v in self.vre_state_dict().items()}
        vre.load_state_dict(sd, strict=True)
        return vre.to(self.dtype)
