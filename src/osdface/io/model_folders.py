"""Model folders on disk: the one reader and writer of the SD 2.1-base folder, the LoRA, the
official three-file release and the osdface model folder.

Every loader of the package goes through here (``OSDFacePipeline.from_official`` /
``from_pretrained`` / ``save_pretrained``, training's ``load_base_model`` / ``load_components`` /
``export_generator`` and checkpoint components), so each guarantee of issue 12 lives once:

* configs are parsed and checked against :mod:`osdface.model_limits` (and against each other)
  *before* anything is allocated;
* each module's declared size (built on the ``meta`` device) must fit in its weights files, and
  each safetensors header must parse (:func:`check_weights_fit`);
* what diffusers raises for a corrupted folder becomes :class:`~osdface.errors.ModelFileError`
  naming the folder (:func:`load_module`);
* small weights (VRE, prompt adapter, LoRA) are refused when they hold NaN/Inf.

Layouts (file names: :mod:`osdface.io.names`):

* SD 2.1-base (``--base-model``): ``scheduler/``, ``unet/``, ``vae/`` — :func:`check_base_model`;
* official release (``--weights``): ``associate_2.ckpt``, ``embedding_change_weights.pth``,
  ``pytorch_lora_weights.safetensors`` — :func:`read_official_adapter`, :func:`read_lora_file`,
  :func:`write_official_layout` (single files are parsed by :mod:`osdface.weights`);
* LoRA folder ``unet_lora/`` (model folder, stage-2 checkpoint): ``pytorch_lora_weights.safetensors``
  (PEFT keys ``unet.<module>.lora_A.weight``) + ``adapter_config.json`` — :func:`read_lora_folder`,
  :func:`write_lora_folder`; applied merged or attached by :func:`apply_lora`;
* model folder: ``model_index.json`` + one subfolder per component — :func:`read_model_folder`,
  :func:`write_model_folder`.

A lower layer: imports models, errors, model_limits, weights and utils only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError, OSDFaceError, WeightsNotFoundError
from ..model_limits import (
    check_finite_weights,
    check_latent_channels,
    check_lora_config,
    check_model_folder_configs,
    check_scheduler_config,
    check_unet_config,
    check_vae_config,
    read_config,
)
from ..utils.io import atomic_path, normalize_permissions, write_text_atomic
from ..utils.logging import get_logger
from ..weights import check_base_model_dir, load_lora_file, load_official_adapter_state_dict
from .names import (
    COMPONENT_CONFIG_NAMES,
    CONFIG_NAME,
    LORA_CONFIG_NAME,
    LORA_KEY_PREFIX,
    LORA_SUBFOLDER,
    LORA_WEIGHTS_NAME,
    MODEL_INDEX,
    OFFICIAL_ADAPTER_FILE,
    OFFICIAL_FILES,
    OFFICIAL_LORA_FILE,
    OFFICIAL_VRE_FILE,
    OFFICIAL_VRE_PREFIX,
    PIPELINE_CLASS_NAME,
    PROMPT_ADAPTER,
    SCHEDULER,
    UNET,
    VAE,
    VRE,
    WEIGHTED_COMPONENTS,
    WEIGHTS_NAME,
    WEIGHTS_STEM,
)

logger = get_logger(__name__)

#: what diffusers' loaders raise for a corrupted folder (bad JSON → OSError, size mismatch →
#: ValueError/RuntimeError, missing config entries → KeyError/TypeError, unknown schedule →
#: NotImplementedError, a RuntimeError)
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)
#: what building a diffusers class from a hostile config raises besides (``act_fn: 5`` →
#: AttributeError from ``.lower()``, a too-short per-block list → IndexError)
BUILD_ERRORS = (*LOAD_ERRORS, AttributeError, IndexError)

#: component → how messages call it
WHAT = {VAE: "VAE", UNET: "UNet", VRE: "visual prompt encoder", PROMPT_ADAPTER: "prompt adapter",
        SCHEDULER: "scheduler"}
#: model_index.json: component → (library, class), as diffusers writes it
COMPONENT_CLASSES = {
    VAE: ("diffusers", "AutoencoderKL"),
    UNET: ("diffusers", "UNet2DConditionModel"),
    VRE: ("osdface", "VisualPromptEncoder"),
    PROMPT_ADAPTER: ("osdface", "PromptAdapter"),
    SCHEDULER: ("diffusers", "DDIMScheduler"),
}


def reason(e: BaseException) -> str:
    """First non-empty line of an exception's message (diffusers' messages run over several lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _component_class(name: str):
    """The class of a model-folder component (diffusers imported here, lazily)."""
    if name in (VRE, PROMPT_ADAPTER):
        from ..models.prompt_encoder import PromptAdapter, VisualPromptEncoder

        return VisualPromptEncoder if name == VRE else PromptAdapter
    import diffusers

    return getattr(diffusers, COMPONENT_CLASSES[name][1])


# ---------------------------------------------------------------------------- one module folder
def read_component_config(root: Path, name: str) -> dict:
    """``root/name/<config>.json`` parsed; :class:`ModelFileError` naming it when malformed."""
    return read_config(root / name / COMPONENT_CONFIG_NAMES[name], f"{WHAT[name]} config")


def check_weights_fit(klass, cfg: dict, folder: Path, what: str, config_name: str = CONFIG_NAME,
                      safetensors_only: bool = True) -> None:
    """The module declared by ``cfg`` must fit in the weights of ``folder``; run after the bounds check.

    Built on the ``meta`` device (no memory), its parameter count × 2 bytes (16-bit storage) may
    not exceed the bytes of its ``diffusion_pytorch_model*.safetensors`` files, whose headers must
    parse. ``safetensors_only=False`` (an SD 2.1-base download, which diffusers may read from
    ``.bin``) also counts ``diffusion_pytorch_model*.bin`` files.

    Raises:
        WeightsNotFoundError: no weights file in ``folder``.
        ModelFileError: naming the file: not valid safetensors, a config diffusers cannot build,
            or a declared module larger than its weights.
    """
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob(f"{WEIGHTS_STEM}*.safetensors"))
    other = [] if safetensors_only else sorted(folder.glob(f"{WEIGHTS_STEM}*.bin"))
    if not files and not other:
        raise WeightsNotFoundError(f"{folder}: no {WEIGHTS_NAME} (only safetensors weights are read)"
                                   if safetensors_only else f"{folder}: no {WEIGHTS_STEM} weights")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"{f}: not a valid safetensors file ({reason(e)})") from None
    config_file = folder / config_name
    try:
        with torch.device("meta"):
            model = klass.from_config(cfg)
    except BUILD_ERRORS as e:
        raise ModelFileError(f"{config_file}: cannot build the {what} from it: {reason(e)}") from e
    numel = sum(p.numel() for p in model.parameters())
    stored = sum(f.stat().st_size for f in files + other)
    if numel * 2 > stored:
        raise ModelFileError(
            f"{config_file}: declares a {what} of {numel} parameters (at least {numel * 2 / 2**20:.1f} MiB "
            f"in 16 bits) but {folder} holds only {stored / 2**20:.1f} MiB of weights"
        )


def load_module(klass, folder: Path, what: str, safetensors_only: bool = True, weights: bool = True):
    """``klass.from_pretrained(folder)`` from local files (safetensors only unless told; a
    scheduler, ``weights=False``, has none); diffusers' errors (:data:`LOAD_ERRORS`) become
    :class:`ModelFileError` naming the folder."""
    kw: dict[str, Any] = {"local_files_only": True}
    if weights and safetensors_only:
        kw["use_safetensors"] = True
    try:
        return klass.from_pretrained(folder, **kw)
    except OSDFaceError:
        raise
    except LOAD_ERRORS as e:
        raise ModelFileError(f"{folder}: cannot load the {what}: {reason(e)}") from e


def load_module_folder(klass, folder: str | os.PathLike, what: str,
                       check: Callable[[dict[str, Any], Path], Any] | None = None,
                       config_name: str = CONFIG_NAME, weights: bool = True):
    """One module folder of a user (a checkpoint component, a base-model part), checked before
    anything is allocated: the config is parsed and passed to ``check`` (bounds, e.g. from
    :mod:`osdface.model_limits`); with ``weights``, :func:`check_weights_fit`; then :func:`load_module`.
    Only safetensors are read.

    Raises:
        WeightsNotFoundError: the folder, its config or its weights file is missing.
        ModelFileError: naming the file: malformed config, out of bounds, too large for its weights,
            not valid safetensors, or diffusers cannot load it.
    """
    folder = Path(folder)
    config_file = folder / config_name
    if not config_file.is_file():
        raise WeightsNotFoundError(f"{config_file}: {what} config not found")
    cfg = read_config(config_file, f"{what} config")
    if check is not None:
        check(cfg, config_file)
    if weights:
        check_weights_fit(klass, cfg, folder, what, config_name)
    return load_module(klass, folder, what, weights=weights)


# ------------------------------------------------------------------------- checked folders
@dataclass(frozen=True)
class CheckedFolder:
    """A folder of diffusers-style components whose configs (and declared sizes) passed every check.

    Attributes:
        root: the folder; ``configs``: component → parsed config.
        safetensors_only: read only ``.safetensors`` weights (``False``: an SD download's ``.bin`` too).
    """

    root: Path
    configs: dict[str, dict]
    safetensors_only: bool = True

    def load(self, name: str):
        """Build component ``name`` (``"unet"``, ``"vae"``, ``"scheduler"``, ``"vre"``, ``"prompt_adapter"``).

        The small modules (VRE, prompt adapter) are checked for NaN/Inf after loading.

        Raises:
            ModelFileError: diffusers cannot load it (naming ``root/name``), or a small module holds
                NaN/Inf (naming its weights file).
        """
        module = load_module(_component_class(name), self.root / name, WHAT[name], self.safetensors_only,
                             weights=name != SCHEDULER)
        if name in (VRE, PROMPT_ADAPTER):
            check_finite_weights(module.state_dict(), self.root / name / WEIGHTS_NAME)
        return module


def check_base_model(base_model: str | os.PathLike, safetensors_only: bool = False,
                     timestep: int | None = None) -> CheckedFolder:
    """Check a Stable Diffusion 2.1-base diffusers folder (``scheduler/``, ``unet/``, ``vae/``).

    Every config is parsed and checked against :mod:`osdface.model_limits`, the UNet's
    ``in_channels``/``out_channels`` against the VAE's ``latent_channels``, the scheduler's
    ``num_train_timesteps`` against ``timestep`` (when given), and the UNet's and VAE's declared
    sizes against their weights — all before anything is built.

    Args:
        safetensors_only: refuse ``.bin`` weights (model folders, training) or accept a download's
            ``diffusion_pytorch_model.bin`` (``OSDFacePipeline.from_official``).

    Raises:
        WeightsNotFoundError: a subfolder, config or weights file is missing.
        ModelFileError: a malformed, implausible or inconsistent config or weights file (named).
    """
    base = check_base_model_dir(base_model)
    unet_cfg, vae_cfg, sched_cfg = (read_component_config(base, name) for name in (UNET, VAE, SCHEDULER))
    unet_file, vae_file = base / UNET / COMPONENT_CONFIG_NAMES[UNET], base / VAE / COMPONENT_CONFIG_NAMES[VAE]
    sched_file = base / SCHEDULER / COMPONENT_CONFIG_NAMES[SCHEDULER]
    check_unet_config(unet_cfg, unet_file)
    check_vae_config(vae_cfg, vae_file)
    n_train = check_scheduler_config(sched_cfg, sched_file)
    if timestep is not None and timestep >= n_train:
        raise ModelFileError(f"{sched_file}: num_train_timesteps = {n_train} does not include OSDFace's "
                             f"timestep {timestep}")
    check_latent_channels(unet_cfg, unet_file, vae_cfg, vae_file)
    for name, cfg in ((UNET, unet_cfg), (VAE, vae_cfg)):
        check_weights_fit(_component_class(name), cfg, base / name, WHAT[name], COMPONENT_CONFIG_NAMES[name],
                          safetensors_only=safetensors_only)
    return CheckedFolder(base, {UNET: unet_cfg, VAE: vae_cfg, SCHEDULER: sched_cfg}, safetensors_only)


def load_base_model(base_model: str | os.PathLike, safetensors_only: bool = True,
                    timestep: int | None = None) -> dict[str, Any]:
    """``{"unet", "vae", "scheduler"}`` of an SD 2.1-base folder after :func:`check_base_model`.

    Raises:
        WeightsNotFoundError, ModelFileError: see :func:`check_base_model` and :meth:`CheckedFolder.load`.
    """
    base = check_base_model(base_model, safetensors_only=safetensors_only, timestep=timestep)
    return {name: base.load(name) for name in (UNET, VAE, SCHEDULER)}


# ------------------------------------------------------------------------------------- LoRA
@dataclass(frozen=True)
class LoraWeights:
    """A UNet LoRA read from disk: ``state_dict`` (PEFT keys ``unet.<module>.lora_A.weight``, finite
    floats), its ``file`` (named in messages) and ``alpha`` (``None`` = the rank, scale 1.0)."""

    file: Path
    state_dict: dict[str, torch.Tensor]
    alpha: float | None = None


def read_lora_file(path: str | os.PathLike, alpha: float | None = None) -> LoraWeights:
    """A LoRA ``.safetensors`` file (e.g. the release's ``pytorch_lora_weights.safetensors``).

    Raises:
        WeightsNotFoundError: no such file.
        ModelFileError: not valid safetensors, or a non-float / NaN / Inf tensor (key named).
    """
    return LoraWeights(Path(path), load_lora_file(path), alpha)


def read_lora_folder(folder: str | os.PathLike) -> LoraWeights:
    """``unet_lora/``: both files present, ``adapter_config.json`` within :data:`osdface.model_limits.LIMITS`,
    then the weights (:func:`read_lora_file`).

    Raises:
        WeightsNotFoundError: the folder lacks one of its two files (both named).
        ModelFileError: a malformed or implausible config, or bad weights (the file named).
    """
    folder = Path(folder)
    weights, cfg_file = folder / LORA_WEIGHTS_NAME, folder / LORA_CONFIG_NAME
    missing = [p.name for p in (weights, cfg_file) if not p.is_file()]
    if missing:
        raise WeightsNotFoundError(f"{folder}: LoRA folder is incomplete, missing {', '.join(missing)}")
    alpha = check_lora_config(read_config(cfg_file, "LoRA adapter config"), cfg_file)
    return read_lora_file(weights, alpha)


def lora_adapter_config(unet) -> dict[str, Any]:
    """``adapter_config.json`` of the peft LoRA on ``unet`` (the one place its fields are chosen)."""
    cfg = next(iter(unet.peft_config.values()))
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
            "format": "peft", "key_prefix": LORA_KEY_PREFIX}


def lora_state_dict(unet, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The peft LoRA on ``unet`` under the release's keys (``unet.<module>.lora_A.weight``), on the
    CPU, contiguous, in ``dtype`` (default: as stored on the UNet)."""
    from peft import get_peft_model_state_dict

    out = {}
    for k, v in get_peft_model_state_dict(unet).items():
        v = v.detach()
        out[f"{LORA_KEY_PREFIX}{k}"] = (v if dtype is None else v.to(dtype)).cpu().contiguous()
    return out


def write_lora_folder(folder: str | os.PathLike, unet, dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (:func:`lora_state_dict`) and
    ``folder/adapter_config.json`` (:func:`lora_adapter_config`), each atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / LORA_WEIGHTS_NAME) as tmp:
        save_file(lora_state_dict(unet, dtype), str(tmp), metadata={"format": "pt"})
    write_text_atomic(folder / LORA_CONFIG_NAME, json.dumps(lora_adapter_config(unet), indent=2))
    return folder


def apply_lora(unet, lora: LoraWeights, fuse: bool) -> None:
    """Merge ``lora`` into ``unet``'s weights (``fuse``; float32 merge, as the official ``merge_Unet``)
    or attach it unmerged via peft.

    Raises:
        LoraFormatError: keys or shapes that do not fit the UNet (naming ``lora.file``); the UNet
            is left unchanged.
    """
    from ..models.lora import attach_lora, merge_lora_into

    if fuse:
        merge_lora_into(unet, lora.state_dict, lora_alpha=lora.alpha, source=str(lora.file))
    else:
        attach_lora(unet, lora.state_dict, lora_alpha=lora.alpha, source=str(lora.file))


def write_base_unet(unet, folder: Path) -> None:
    """Save a peft-wrapped UNet's base (or merged) weights under the plain diffusers key names."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in unet.state_dict().items():
        if ".lora_" in k or "lora_magnitude" in k:
            continue
        sd[k.replace(".base_layer.", ".")] = v.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_config(folder)
    save_file(sd, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


# --------------------------------------------------------------------------- official layout
def read_official_adapter(path: str | os.PathLike, embed_dim: int, cross_attention_dim):
    """The :class:`~osdface.models.PromptAdapter` ``embed_dim → cross_attention_dim`` from an
    ``embedding_change_weights.pth``-layout file, keys and shapes checked strictly.

    Raises:
        WeightsNotFoundError, UnsafeCheckpointError, ModelFileError: see
            :func:`osdface.weights.load_official_adapter_state_dict`.
    """
    from ..models.prompt_encoder import PromptAdapter

    adapter = PromptAdapter(embed_dim, cross_attention_dim)
    adapter.load_state_dict(load_official_adapter_state_dict(path, expected=adapter.state_dict()), strict=True)
    return adapter


def official_layout_taken(out_dir: str | os.PathLike) -> list[str]:
    """The official release file names that already exist in ``out_dir`` (never overwritten)."""
    return [n for n in OFFICIAL_FILES if (Path(out_dir) / n).exists()]


def write_official_layout(vre, adapter, lora: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``associate_2.ckpt``, ``embedding_change_weights.pth`` and ``pytorch_lora_weights.safetensors``.

    * ``associate_2.ckpt``: ``{"state_dict": {"vqvae_LQ.<VRE key>": tensor}}`` — plain tensors, loads
      with ``torch.load(weights_only=True)`` and the official prefix filter;
    * ``embedding_change_weights.pth``: the adapter's plain 4-tensor state dict;
    * ``pytorch_lora_weights.safetensors``: PEFT keys ``unet.<module>.lora_A.weight`` / ``lora_B``.

    All three are written to temporaries first and renamed only when all three succeeded.

    Returns:
        the three paths, in :data:`~osdface.io.names.OFFICIAL_FILES` order.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / OFFICIAL_VRE_FILE, out / OFFICIAL_ADAPTER_FILE, out / OFFICIAL_LORA_FILE]
    with contextlib.ExitStack() as stack:
        tmp_vre, tmp_adapter, tmp_lora = (stack.enter_context(atomic_path(p)) for p in paths)
        torch.save({"state_dict": {f"{OFFICIAL_VRE_PREFIX}{k}": v.detach().float().cpu().clone()
                                   for k, v in vre.state_dict().items()}}, tmp_vre)
        torch.save({k: v.detach().float().cpu().clone() for k, v in adapter.state_dict().items()}, tmp_adapter)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in lora.items()}, str(tmp_lora),
                  metadata={"format": "pt"})
        normalize_permissions(out, [tmp_vre, tmp_adapter, tmp_lora])  # safetensors writes 0600
    logger.info("wrote the official layout to %s", out)
    return paths


# ----------------------------------------------------------------------------- model folder
@dataclass(frozen=True)
class ModelFolder(CheckedFolder):
    """A model folder (``model_index.json`` + components) that passed every check of :func:`read_model_folder`.

    Attributes:
        timestep / resolution: as the pipeline will use them (defaults filled in).
        lora: the unmerged LoRA of ``unet_lora/``, or ``None`` (merged into ``unet/``).
    """

    timestep: int = 0
    resolution: int = 0
    lora: LoraWeights | None = None


def read_model_folder(path: str | os.PathLike) -> ModelFolder:
    """Check a model folder written by :func:`write_model_folder` before anything is built.

    Every JSON config is parsed and checked against :data:`osdface.model_limits.LIMITS` and against
    the others (latent channels, cross-attention width, token width, resolution, timestep); the
    LoRA folder's config and weights are read (finite floats); each component's declared size must
    fit in its weights file and each safetensors header must parse. Only safetensors are read.

    Raises:
        WeightsNotFoundError: no ``model_index.json``, or a component folder, config or weights
            file is missing.
        ModelFileError: a malformed, out-of-bounds or inconsistent config, or a bad weights file (named).
    """
    path = Path(path).expanduser()
    index_file = path / MODEL_INDEX
    if not index_file.is_file():
        raise WeightsNotFoundError(
            f"{path} is not an osdface model folder (no {MODEL_INDEX}). Create one with "
            "'osdface convert --base-model SD_DIR --weights OSDFACE_DIR -o MODEL_DIR', or pass "
            "--base-model and --weights to use the official files directly."
        )
    index = read_config(index_file, "model index")
    class_name = index.get("_class_name", PIPELINE_CLASS_NAME)
    if class_name != PIPELINE_CLASS_NAME:
        raise ModelFileError(
            f"{index_file}: _class_name is {class_name!r}, not {PIPELINE_CLASS_NAME!r}; this is not an osdface "
            "model folder (an SD 2.1-base folder goes to --base-model, with --weights)"
        )
    missing = [name for name in COMPONENT_CLASSES if not (path / name).is_dir()]
    missing += [f"{name}/{COMPONENT_CONFIG_NAMES[name]}" for name in COMPONENT_CLASSES
                if name not in missing and not (path / name / COMPONENT_CONFIG_NAMES[name]).is_file()]
    missing += [f"{name}/{WEIGHTS_NAME}" for name in WEIGHTED_COMPONENTS
                if (path / name).is_dir() and not (path / name / WEIGHTS_NAME).is_file()]
    if missing:
        raise WeightsNotFoundError(f"{path}: model folder is incomplete, missing {', '.join(missing)}")
    configs = {name: (path / name / COMPONENT_CONFIG_NAMES[name], read_component_config(path, name))
               for name in COMPONENT_CLASSES}
    timestep, resolution = check_model_folder_configs(index, index_file, configs)
    lora = read_lora_folder(path / LORA_SUBFOLDER) if (path / LORA_SUBFOLDER).exists() else None
    for name in (UNET, VAE, VRE, PROMPT_ADAPTER):
        check_weights_fit(_component_class(name), configs[name][1], path / name, WHAT[name],
                          COMPONENT_CONFIG_NAMES[name])
    return ModelFolder(path, {name: cfg for name, (_, cfg) in configs.items()}, True,
                       timestep=timestep, resolution=resolution, lora=lora)


def write_model_folder(path: str | os.PathLike, *, vae, unet, vre, prompt_adapter, scheduler, timestep: int,
                       resolution: int, fuse_lora: bool = True) -> Path:
    """Write a self-contained model folder (safetensors + JSON only).

    With an unmerged (peft) LoRA on the UNet, ``fuse_lora=True`` writes merged UNet weights;
    ``fuse_lora=False`` writes the base UNet plus ``unet_lora/`` (:func:`write_lora_folder`, in the
    UNet's dtype). ``model_index.json`` records the components, ``timestep`` and ``resolution``.
    """
    from .._version import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, module in ((VAE, vae), (VRE, vre), (PROMPT_ADAPTER, prompt_adapter)):
        module.save_pretrained(path / name, safe_serialization=True)
    scheduler.save_pretrained(path / SCHEDULER)
    has_adapter = bool(getattr(unet, "peft_config", None))
    if has_adapter and fuse_lora:
        merged = copy.deepcopy(unet)
        merged.fuse_lora()
        write_base_unet(merged, path / UNET)
    elif has_adapter:
        write_base_unet(unet, path / UNET)
        write_lora_folder(path / LORA_SUBFOLDER, unet)
    else:
        unet.save_pretrained(path / UNET, safe_serialization=True)
    index = {"_class_name": PIPELINE_CLASS_NAME, "_osdface_version": __version__,
             **{k: list(v) for k, v in COMPONENT_CLASSES.items()},
             "timestep": timestep, "resolution": resolution}
    write_text_atomic(path / MODEL_INDEX, json.dumps(index, indent=2))
    normalize_permissions(path)  # safetensors writes 0600 files
    return path


__all__ = [
    "BUILD_ERRORS", "COMPONENT_CLASSES", "CheckedFolder", "LOAD_ERRORS", "LoraWeights", "ModelFolder", "WHAT",
    "apply_lora", "check_base_model", "check_weights_fit", "load_base_model", "load_module", "load_module_folder",
    "lora_adapter_config", "lora_state_dict", "official_layout_taken", "read_component_config",
    "read_lora_file", "read_lora_folder", "read_model_folder", "read_official_adapter", "reason",
    "write_base_unet", "write_lora_folder", "write_model_folder", "write_official_layout",
]
