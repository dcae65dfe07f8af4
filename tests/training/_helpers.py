"""Plain helpers shared by the training tests (imported as ``_helpers``; pytest puts this folder on sys.path)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from safetensors.torch import load_file


def free_port() -> int:
    """A free TCP port on the loopback interface (for the DDP rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generator_trained_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every trainable tensor of a stage-2 checkpoint: LoRA, prompt adapter, discriminator LoRA + head."""
    out = {f"lora.{k}": v for k, v in load_file(str(ckpt / "unet_lora" / "pytorch_lora_weights.safetensors")).items()}
    out.update({f"adapter.{k}": v for k, v in
                load_file(str(ckpt / "prompt_adapter" / "diffusion_pytorch_model.safetensors")).items()})
    out.update({f"disc.{k}": v for k, v in load_file(str(ckpt / "discriminator" / "trainable.safetensors")).items()})
    return out
