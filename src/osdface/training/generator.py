"""Stage 2 (docs/method.md §6): the generator's model I/O — reading its inputs, writing its outputs.

* inputs: :func:`load_base_model` (the SD 2.1-base folder), :func:`load_vre` / :func:`load_vre_folder`
  (the frozen VRE), :func:`load_components` (everything a run starts from, per ``model`` config);
* checkpoints: :class:`LoraFolder`, the UNet LoRA's ``unet_lora/`` view (official PEFT keys);
* deliverables: :func:`write_official_layout_files` (the three official release files) and
  :func:`export_generator` (a checkpoint → model folder and/or official files).

The experiment settings are in :mod:`osdface.training.generator_config`, the model and the
training task in :mod:`osdface.training.generator_task`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsNotFoundError
from ..io.model_folders import write_official_layout
from ..io.names import CONFIG_NAME, OFFICIAL_VRE_FILE
from ..models.prompt_encoder import PromptAdapter, VisualPromptEncoder
from ..utils.logging import get_logger
from .checkpoint import load_module_folder, resolve_checkpoint
from .generator_config import GeneratorModelConfig, load_generator_config

logger = get_logger(__name__)

DISC_TRAINABLE_NAME = "trainable.safetensors"  # the discriminator's LoRA + head in a checkpoint


# ------------------------------------------------------------------------------ components
def load_vre_folder(folder: str | os.PathLike) -> VisualPromptEncoder:
    """A :class:`VisualPromptEncoder` ``save_pretrained`` folder, its config checked against
    :mod:`osdface.model_limits` and its declared size against its weights before anything is built.

    Raises:
        WeightsNotFoundError, ModelFileError: see :func:`~osdface.training.checkpoint.load_module_folder`.
    """
    from ..model_limits import check_vre_config

    return load_module_folder(VisualPromptEncoder, folder, "visual prompt encoder", check=check_vre_config)


def load_vre(path: str | os.PathLike) -> VisualPromptEncoder:
    """A frozen VRE from a ``VisualPromptEncoder`` folder or an ``associate_2.ckpt``-layout file.

    The architecture of a checkpoint file is read from its tensor shapes (as ``from_official``).

    Raises:
        WeightsNotFoundError: nothing usable at ``path``.
        ModelFileError / UnsafeCheckpointError: a malformed, implausible or unsafe file (named).
    """
    from ..weights import load_official_vre

    p = Path(path).expanduser()
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            return load_vre_folder(p)
        for sub in (p / "vre", p / "export" / "vre"):  # a stage-1 export or run folder
            if (sub / CONFIG_NAME).is_file():
                return load_vre_folder(sub)
        if (p / OFFICIAL_VRE_FILE).is_file():
            p = p / OFFICIAL_VRE_FILE
        else:
            raise WeightsNotFoundError(
                f"{p} holds no VRE: give a VisualPromptEncoder folder (config.json + safetensors, e.g. a "
                f"stage-1 RUN/export/vre) or an {OFFICIAL_VRE_FILE} file")
    if not p.is_file():
        raise WeightsNotFoundError(
            f"VRE {p} not found: pass --vre with a stage-1 export (RUN/export/vre or RUN/export/{OFFICIAL_VRE_FILE}) "
            f"or the official {OFFICIAL_VRE_FILE}")
    return load_official_vre(p)


def load_base_model(base_model: str | os.PathLike) -> dict[str, Any]:
    """``{"unet", "vae", "scheduler"}`` of a Stable Diffusion 2.1-base diffusers folder, each config
    checked against :mod:`osdface.model_limits` (and each declared size against its weights) first;
    only safetensors weights are read (:func:`osdface.io.model_folders.load_base_model`).

    Raises:
        WeightsNotFoundError: a subfolder, config or weights file is missing.
        ModelFileError: a malformed or implausible config or weights file (named).
    """
    from ..io.model_folders import load_base_model as _load_base_model

    return _load_base_model(base_model, safetensors_only=True)


def load_components(cfg: GeneratorModelConfig) -> dict[str, Any]:
    """Read the base model and the VRE/adapter/LoRA starting point named by ``cfg`` (local files only).

    Returns ``{"vae", "unet", "scheduler", "vre", "prompt_adapter" (or None), "lora" (state dict or None),
    "lora_source" (its file, for messages; or None)}``.

    Raises:
        WeightsNotFoundError: a folder or file is missing.
        ModelFileError / UnsafeCheckpointError / LoraFormatError: a malformed, implausible or
            unsafe file (the message names it).
    """
    from ..io.model_folders import read_lora_file, read_official_adapter
    from ..weights import find_official_files

    if not cfg.base_model:
        raise WeightsNotFoundError("no base model: pass --base-model SD_DIR (the Stable Diffusion 2.1-base "
                                   "diffusers folder with scheduler/, unet/, vae/) or set model.base_model")
    if not cfg.vre and not cfg.weights:
        raise WeightsNotFoundError(f"no VRE: pass --vre PATH (stage-1 export or {OFFICIAL_VRE_FILE}) to train from "
                                   "scratch, or --weights OSDFACE_DIR to fine-tune the official release")
    out: dict[str, Any] = {**load_base_model(cfg.base_model), "prompt_adapter": None, "lora": None,
                           "lora_source": None}
    if cfg.weights:
        files = find_official_files(cfg.weights)
        vre = load_vre(cfg.vre or files.vre)
        adapter = read_official_adapter(files.adapter, vre.config.embed_dim, out["unet"].config.cross_attention_dim)
        lora = read_lora_file(files.lora)
        out.update(vre=vre, prompt_adapter=adapter, lora=lora.state_dict, lora_source=str(lora.file))
        logger.info("fine-tuning the official release in %s", cfg.weights)
    else:
        out["vre"] = load_vre(cfg.vre)
    return out


class LoraFolder:
    """Checkpoint view of the UNet's peft LoRA: ``save_pretrained`` writes the official PEFT keys
    (``unet.<module>.lora_A.weight``, float32) + ``adapter_config.json`` (the pipeline's ``unet_lora/``
    layout; :func:`osdface.io.model_folders.write_lora_folder`)."""

    def __init__(self, unet):
        self.unet = unet

    def state_dict(self) -> dict[str, torch.Tensor]:
        from ..io.model_folders import lora_state_dict

        return lora_state_dict(self.unet, torch.float32)

    def config(self) -> dict[str, Any]:
        from ..io.model_folders import lora_adapter_config

        return lora_adapter_config(self.unet)

    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True) -> None:
        from ..io.model_folders import write_lora_folder

        write_lora_folder(folder, self.unet, torch.float32)


# ---------------------------------------------------------------------------------- export
#: the three official release files of a trained generator (one implementation, in the io layer)
write_official_layout_files = write_official_layout


def export_generator(run_or_checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                     base_model: str | os.PathLike | None = None, fuse_lora: bool = True,
                     official_dir: str | os.PathLike | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Turn a stage-2 checkpoint (or the latest of a run) into deliverables.

    Args:
        run_or_checkpoint: a run folder or one of its ``checkpoints/step-*`` folders.
        out_dir: model folder for ``OSDFacePipeline.from_pretrained`` / ``osdface restore --model``.
        base_model: the SD 2.1-base folder (default: the run's ``model.base_model``).
        fuse_lora: merge the LoRA into the UNet (default) or keep ``unet_lora/``.
        official_dir: also write the three official release files there.
        dtype: stored precision of the model folder (``fp32`` default, ``fp16``, ``bf16``).

    Everything is read and checked before anything is written; the official files are refused
    where such files already exist (they could be the release the run started from).

    Returns:
        ``{"checkpoint", "model", "official"}`` (paths, ``None`` where not written).

    Raises:
        WeightsNotFoundError: no checkpoint, a missing component, or no base model.
        ModelFileError: a corrupt, incomplete or implausible checkpoint or base model (named).
        OutputPathError: ``official_dir`` already holds official-layout files.
    """
    from ..errors import OutputPathError
    from ..io.model_folders import apply_lora, official_layout_taken, read_lora_folder
    from ..io.names import LORA_SUBFOLDER, PROMPT_ADAPTER, VRE
    from ..model_limits import check_adapter_config
    from ..pipelines.pipeline_osdface import OSDFacePipeline

    ckpt = resolve_checkpoint(run_or_checkpoint)
    missing = [n for n in (LORA_SUBFOLDER, PROMPT_ADAPTER, VRE) if not (ckpt / n).is_dir()]
    if missing:
        hint = " (a stage-1 run? its VRE is in RUN/export/vre)" if (ckpt / "vqgan_lq").is_dir() else ""
        raise WeightsNotFoundError(f"{ckpt} is not a stage-2 generator checkpoint: missing "
                                   f"{', '.join(missing)}/{hint}")
    if official_dir is not None:
        taken = official_layout_taken(official_dir)
        if taken:
            raise OutputPathError(f"{official_dir} already holds {', '.join(taken)}; choose another folder for "
                                  "--official-layout (existing release files are never overwritten)")
    cfg = load_generator_config(ckpt / "config.yaml")
    lora = read_lora_folder(ckpt / LORA_SUBFOLDER)
    vre = load_vre_folder(ckpt / VRE)
    adapter = load_module_folder(PromptAdapter, ckpt / PROMPT_ADAPTER, "prompt adapter", check=check_adapter_config)
    pipe = None
    if out_dir is not None:
        base = base_model or cfg.model.base_model
        if not base:
            raise WeightsNotFoundError(f"{ckpt}: the run records no base model; pass --base-model SD_DIR")
        parts = load_base_model(base)
        unet = parts["unet"]
        apply_lora(unet, lora, fuse_lora)
        pipe = OSDFacePipeline(parts["vae"], unet, vre, adapter, parts["scheduler"], timestep=cfg.model.timestep)
        if dtype not in (None, "fp32"):
            pipe.to(dtype=dtype)
    result: dict[str, Any] = {"checkpoint": ckpt, "model": None, "official": None}
    if pipe is not None:  # first: the CLI writes it into a temporary folder that a later error removes
        result["model"] = pipe.save_pretrained(out_dir, fuse_lora=fuse_lora)  # normal permissions included
        logger.info("exported %s to %s", ckpt, out_dir)
    if official_dir is not None:
        result["official"] = write_official_layout(vre, adapter, lora.state_dict, official_dir)
    return result


__all__ = [
    "load_base_model", "load_components", "load_vre", "load_vre_folder", "LoraFolder", "export_generator",
    "write_official_layout_files", "load_generator_config", "DISC_TRAINABLE_NAME",
]
