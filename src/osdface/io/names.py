"""Every file and subfolder name of the official OSDFace release and of an osdface model folder, once.

The official release (docs/method.md §3; ``--weights OSDFACE_DIR``)::

    associate_2.ckpt                   OFFICIAL_VRE_FILE      Lightning pickle, VRE under ``vqvae_LQ.``
    embedding_change_weights.pth       OFFICIAL_ADAPTER_FILE  the prompt adapter's 4-tensor state dict
    pytorch_lora_weights.safetensors   OFFICIAL_LORA_FILE     UNet LoRA, PEFT keys ``unet.<module>.lora_A.weight``

An SD 2.1-base diffusers folder (``--base-model``): ``scheduler/``, ``unet/``, ``vae/``, each with
its config (:data:`BASE_MODEL_SUBFOLDERS`) and ``diffusion_pytorch_model.*`` weights.

A model folder (``OSDFacePipeline.save_pretrained`` / ``osdface convert``)::

    model_index.json                   MODEL_INDEX
    vae/ unet/ vre/ prompt_adapter/    config.json + diffusion_pytorch_model.safetensors (WEIGHTS_NAME)
    scheduler/                         scheduler_config.json
    unet_lora/                         LORA_SUBFOLDER (only when the LoRA is kept unmerged):
                                       pytorch_lora_weights.safetensors + adapter_config.json

A stage-2 training checkpoint holds the same ``unet_lora/``, ``prompt_adapter/`` and ``vre/``.

Strings only: nothing to import but this module.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------ official release
OFFICIAL_VRE_FILE = "associate_2.ckpt"
OFFICIAL_ADAPTER_FILE = "embedding_change_weights.pth"
OFFICIAL_LORA_FILE = "pytorch_lora_weights.safetensors"
#: the three files of the release, in the order the official ``infer.py`` reads them
OFFICIAL_FILES = (OFFICIAL_VRE_FILE, OFFICIAL_ADAPTER_FILE, OFFICIAL_LORA_FILE)
#: key prefix of the VRE's tensors in ``associate_2.ckpt`` (its ``state_dict``)
OFFICIAL_VRE_PREFIX = "vqvae_LQ."

# ------------------------------------------------------------------------- diffusers-style parts
#: config file of a diffusers module folder (``ModelMixin.save_config``)
CONFIG_NAME = "config.json"
#: config file of a diffusers scheduler folder
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
#: the weights file of each module subfolder (diffusers' name; only safetensors are read from model folders)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: stem of diffusers' weights files (sharded ``…-00001-of-00002.safetensors`` and legacy ``.bin`` included)
WEIGHTS_STEM = "diffusion_pytorch_model"

# ------------------------------------------------------------------------------- subfolders
UNET = "unet"
VAE = "vae"
SCHEDULER = "scheduler"
VRE = "vre"
PROMPT_ADAPTER = "prompt_adapter"

#: SD 2.1-base subfolder → the config file diffusers reads there
BASE_MODEL_SUBFOLDERS = {SCHEDULER: SCHEDULER_CONFIG_NAME, UNET: CONFIG_NAME, VAE: CONFIG_NAME}
#: model-folder subfolder → its config file
COMPONENT_CONFIG_NAMES = {VAE: CONFIG_NAME, UNET: CONFIG_NAME, VRE: CONFIG_NAME, PROMPT_ADAPTER: CONFIG_NAME,
                          SCHEDULER: SCHEDULER_CONFIG_NAME}
#: model-folder subfolders that hold a :data:`WEIGHTS_NAME`
WEIGHTED_COMPONENTS = (VAE, UNET, VRE, PROMPT_ADAPTER)

# ------------------------------------------------------------------------------------- LoRA
#: the unmerged UNet LoRA of a model folder or a stage-2 checkpoint
LORA_SUBFOLDER = "unet_lora"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"
#: prefix of the UNet's LoRA keys in the release and in :data:`LORA_WEIGHTS_NAME` files
LORA_KEY_PREFIX = "unet."

# ----------------------------------------------------------------------------- model folder
MODEL_INDEX = "model_index.json"
PIPELINE_CLASS_NAME = "OSDFacePipeline"

__all__ = [
    "BASE_MODEL_SUBFOLDERS", "COMPONENT_CONFIG_NAMES", "CONFIG_NAME", "LORA_CONFIG_NAME", "LORA_KEY_PREFIX",
    "LORA_SUBFOLDER", "LORA_WEIGHTS_NAME", "MODEL_INDEX", "OFFICIAL_ADAPTER_FILE", "OFFICIAL_FILES",
    "OFFICIAL_LORA_FILE", "OFFICIAL_VRE_FILE", "OFFICIAL_VRE_PREFIX", "PIPELINE_CLASS_NAME", "PROMPT_ADAPTER",
    "SCHEDULER", "SCHEDULER_CONFIG_NAME", "UNET", "VAE", "VRE", "WEIGHTED_COMPONENTS", "WEIGHTS_NAME",
    "WEIGHTS_STEM",
]
