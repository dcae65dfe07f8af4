"""Model components: pure ``nn.Module`` classes, each saving and loading on its own.

The diffusers-style components (``ModelMixin`` + ``ConfigMixin``, ``save_pretrained`` /
``from_pretrained`` with ``config.json`` + safetensors) are re-exported here, imported lazily so
that ``import osdface.models`` stays cheap::

    from osdface.models import VisualPromptEncoder
    vre = VisualPromptEncoder.from_pretrained("model", subfolder="prompt_encoder")

The SD 2.1-base UNet and VAE are stock diffusers classes and are not repeated here.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "VisualPromptEncoder": "osdface.models.prompt_encoder",
    "PromptAdapter": "osdface.models.prompt_encoder",
    "VQAutoencoder": "osdface.models.vqgan",
    "NLayerDiscriminator": "osdface.models.discriminator",
    "LatentDiscriminator": "osdface.models.latent_discriminator",
    "ArcFaceResNet": "osdface.models.identity",
    "IResNet": "osdface.models.identity",
    "InceptionResnetV1": "osdface.models.identity",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'osdface.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
