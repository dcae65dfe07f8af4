"""Latent discriminator of stage 2: a noise-aware UNet-encoder discriminator (docs/method.md §6.2d, [OURS]).

OSDFace's GAN guidance compares the generator's latents ``ẑ_H`` with the HQ latents ``z_H`` in
latent space, conditioned on the visual prompt. The paper's exact discriminator is unknown; this
is the DFOSD "noise-aware discriminator" form chosen in the spec:

* backbone: a copy of the SD UNet's ``conv_in``, time embedding, ``down_blocks`` and ``mid_block``
  (frozen), with LoRA adapters (rank/alpha/targets in the config; default r 16 / α 16 on the
  generator's module types) — cross-attention reads the (detached) visual prompt;
* head: global average pool of the mid-block output → ``Linear(C, 512)`` → ``LeakyReLU(0.2)`` →
  ``Linear(512, 1)`` (trainable);
* input: the forward-diffused latent ``F(z, t) = √ᾱ_t·z + √(1−ᾱ_t)·ε`` at ``t ~ U{0..999}``
  (:func:`osdface.losses.gan_latent.diffuse_latents`), with ``t`` given to the time embedding.

The constructor arguments are the config (``save_pretrained`` / ``from_pretrained`` round-trip the
whole module, LoRA included). :meth:`LatentDiscriminator.from_unet` builds one from a generator UNet
and copies its encoder weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .lora import DEFAULT_UNET_LORA_TARGETS

#: UNet2DConditionModel config keys that shape the encoder half (copied by :meth:`from_unet`).
ENCODER_CONFIG_KEYS = (
    "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
    "attention_head_dim", "num_attention_heads", "norm_num_groups", "norm_eps", "use_linear_projection",
    "transformer_layers_per_block", "flip_sin_to_cos", "freq_shift", "act_fn", "downsample_padding",
    "mid_block_type", "mid_block_scale_factor", "only_cross_attention", "upcast_attention",
    "resnet_time_scale_shift", "dual_cross_attention", "time_embedding_type", "sample_size",
)
#: LoRA targets of the discriminator: the generator's list minus ``conv_out`` (no output conv here).
DEFAULT_DISC_LORA_TARGETS = tuple(t for t in DEFAULT_UNET_LORA_TARGETS if t != "conv_out")


class LatentDiscriminator(ModelMixin, ConfigMixin):
    """Prompt-conditioned latent discriminator: ``(F(z, t), t, prompt) → (B,)`` real/fake logits.

    Args:
        unet_config: the UNet2DConditionModel settings of the encoder half (keys of
            :data:`ENCODER_CONFIG_KEYS`; the rest of a UNet config is ignored).
        head_channels: hidden width of the MLP head (512).
        lora_rank / lora_alpha: LoRA on the frozen backbone (``0`` = no LoRA: the backbone is trainable
            as a whole — not the paper recipe, only for experiments).
        lora_targets: module-name suffixes that get LoRA (peft ``target_modules``).
        leaky_slope: negative slope of the head's LeakyReLU (0.2).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, unet_config: dict | None = None, head_channels: int = 512, lora_rank: int = 16,
                 lora_alpha: float = 16.0, lora_targets: Sequence[str] = DEFAULT_DISC_LORA_TARGETS,
                 leaky_slope: float = 0.2):
        super().__init__()
        from diffusers import UNet2DConditionModel

        cfg = {k: v for k, v in (unet_config or {}).items() if k in ENCODER_CONFIG_KEYS}
        n_down = len(cfg.get("down_block_types") or ()) or 4
        cfg["up_block_types"] = ("UpBlock2D",) * n_down  # the decoder half is built on "meta" and dropped
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg)
        # The encoder half of the UNet (same module names, so weights copy 1:1), materialised with
        # PyTorch's default initialisation (from_unet / from_pretrained overwrite it).
        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        del unet
        for part in (self.conv_in, self.time_embedding, self.down_blocks, self.mid_block):
            if part is None:
                continue
            part.to_empty(device="cpu")
            for m in part.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        if self.mid_block is None:
            raise ValueError("LatentDiscriminator needs a UNet with a mid block")
        mid_channels = int(cfg.get("block_out_channels", (320, 640, 1280, 1280))[-1])
        self.head = nn.Sequential(
            nn.Linear(mid_channels, head_channels), nn.LeakyReLU(leaky_slope), nn.Linear(head_channels, 1)
        )
        if lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model

            self.requires_grad_(False)
            # the head's layers ("head.0", "head.2") match no target suffix: LoRA lands on the backbone only
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(lora_targets)),
                                    self)
            for name, p in self.named_parameters():
                p.requires_grad_(".lora_" in name or name.startswith("head."))

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_unet(cls, unet, head_channels: int = 512, lora_rank: int = 16, lora_alpha: float = 16.0,
                  lora_targets: Sequence[str] = DEFAULT_DISC_LORA_TARGETS, seed: int | None = None
                  ) -> LatentDiscriminator:
        """A discriminator whose frozen backbone is a copy of ``unet``'s encoder half.

        Args:
            unet: a diffusers ``UNet2DConditionModel`` (its base weights are copied; a peft LoRA on it
                is ignored — the copy starts from the *base* weights).
            seed: seeds the head/LoRA initialisation (default: the global RNG).
        """
        cfg = {k: _plain(v) for k, v in dict(unet.config).items() if k in ENCODER_CONFIG_KEYS}
        if seed is not None:
            torch.manual_seed(seed)
        disc = cls(unet_config=cfg, head_channels=head_channels, lora_rank=lora_rank, lora_alpha=lora_alpha,
                   lora_targets=tuple(lora_targets))
        disc.load_backbone_from_unet(unet)
        return disc

    @torch.no_grad()
    def load_backbone_from_unet(self, unet) -> int:
        """Copy the base weights of ``unet``'s conv_in / time embedding / down blocks / mid block.

        Returns the number of tensors copied. Raises if a backbone tensor has no counterpart.
        """
        src = {}
        for k, v in unet.state_dict().items():
            if ".lora_" in k or "lora_magnitude" in k:
                continue
            src[k.replace(".base_layer.", ".")] = v
        own = self.state_dict()
        copied = 0
        missing = []
        for k, v in own.items():
            if ".lora_" in k or k.startswith("head."):
                continue
            key = k.replace(".base_layer.", ".")
            if key not in src:
                missing.append(key)
                continue
            v.copy_(src[key].to(v.dtype))
            copied += 1
        if missing:
            raise ValueError(f"UNet has no weights for discriminator tensors {missing[:5]} (architectures differ)")
        return copied

    # ------------------------------------------------------------------------------- forward
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that train (LoRA + head), by state-dict name."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> torch.Tensor:
        """Score noised latents.

        Args:
            latents: ``(B, 4, h, w)`` noised latents ``F(z, t)`` (scaled by the VAE scaling factor).
            timesteps: ``(B,)`` integer timesteps in ``[0, 1000)``.
            encoder_hidden_states: ``(B, T, cross_attention_dim)`` visual prompt (detach it first).

        Returns:
            ``(B,)`` logits (real > 0 > fake after training).
        """
        t = timesteps.to(latents.device).reshape(-1).expand(latents.shape[0])
        t_emb = self.time_proj(t).to(dtype=latents.dtype)  # (B, C0)
        emb = self.time_embedding(t_emb)  # (B, 4·C0)
        h = self.conv_in(latents)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)  # (B, C, h/8, w/8)
        return self.head(h.mean(dim=(2, 3))).squeeze(-1)  # (B, C) → (B,)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


__all__ = ["LatentDiscriminator", "DEFAULT_DISC_LORA_TARGETS", "ENCODER_CONFIG_KEYS"]
