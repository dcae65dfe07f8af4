"""Where weights live and how the official OSDFace release files are read.

Nothing here downloads. A missing file raises :class:`WeightsNotFoundError`, whose message says
which file is needed and where to put it. Importing this module imports no torch/diffusers, so
:func:`require_model_weights` answers a first run in well under 2 s; the readers import torch
when called.

Default layout (``$OSDFACE_HOME``, default ``~/.cache/osdface``)::

    $OSDFACE_HOME/
      stable-diffusion-2-1-base/      diffusers folder: scheduler/, unet/, vae/ (text encoder not needed)
      OSDFace/                         the official release files
        associate_2.ckpt
        embedding_change_weights.pth
        pytorch_lora_weights.safetensors
      model/                           optional: a converted model (``osdface convert ... -o``)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError, WeightsNotFoundError
from .io.names import (  # re-exported here, their old home (file names live in osdface.io.names)
    BASE_MODEL_SUBFOLDERS,
    MODEL_INDEX,
    OFFICIAL_ADAPTER_FILE,
    OFFICIAL_FILES,
    OFFICIAL_LORA_FILE,
    OFFICIAL_VRE_FILE,
    OFFICIAL_VRE_PREFIX,
)

#: what the official files must be, in :func:`~osdface.io.state_dicts.check_state_dict`'s messages
VRE_WHAT = f"the OSDFace VRE ({OFFICIAL_VRE_FILE} layout) this model expects"
ADAPTER_WHAT = f"the OSDFace prompt adapter ({OFFICIAL_ADAPTER_FILE} layout) this model expects"

OFFICIAL_WEIGHTS_HELP = (
    "The OSDFace release files are linked from the official repository's README "
    "(https://github.com/jkwang28/OSDFace, 'pretrained' folder). "
    "SD 2.1-base is 'stabilityai/stable-diffusion-2-1-base' in diffusers format "
    "(it was removed from the Hugging Face hub in 2025; mirrors such as ModelScope carry it)."
)


def osdface_home() -> Path:
    """``$OSDFACE_HOME`` or ``~/.cache/osdface``."""
    return Path(os.environ.get("OSDFACE_HOME", Path.home() / ".cache" / "osdface")).expanduser()


def default_base_model_dir() -> Path:
    return osdface_home() / "stable-diffusion-2-1-base"


def default_official_dir() -> Path:
    return osdface_home() / "OSDFace"


def default_model_dir() -> Path:
    return osdface_home() / "model"


@dataclass(frozen=True)
class OfficialFiles:
    """Paths of the three official release files."""

    vre: Path
    adapter: Path
    lora: Path


def check_base_model_dir(base_model: str | os.PathLike) -> Path:
    """Validate an SD 2.1-base diffusers folder (``scheduler/``, ``unet/``, ``vae/`` with configs)."""
    base = Path(base_model).expanduser()
    missing = []
    for sub, config in BASE_MODEL_SUBFOLDERS.items():
        if not (base / sub).is_dir():
            missing.append(f"{sub}/")
        elif not (base / sub / config).is_file():
            missing.append(f"{sub}/{config}")
    if missing:
        raise WeightsNotFoundError(
            f"Stable Diffusion 2.1-base folder {base} is missing {', '.join(missing)}. "
            f"Put the diffusers-format 'stable-diffusion-2-1-base' there (needs scheduler/, unet/, vae/). "
            + OFFICIAL_WEIGHTS_HELP
        )
    return base


def find_official_files(weights_dir: str | os.PathLike) -> OfficialFiles:
    """Locate the three official files in ``weights_dir``; one error lists all that are missing."""
    d = Path(weights_dir).expanduser()
    missing = [name for name in OFFICIAL_FILES if not (d / name).is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"OSDFace weights folder {d} is missing {', '.join(missing)}. "
            f"Put the official release files ({', '.join(OFFICIAL_FILES)}) in that folder. " + OFFICIAL_WEIGHTS_HELP
        )
    return OfficialFiles(d / OFFICIAL_VRE_FILE, d / OFFICIAL_ADAPTER_FILE, d / OFFICIAL_LORA_FILE)


def check_release_tensors(source: Path, sd: dict, what: str) -> None:
    """Every entry of an official release state dict is a finite floating-point tensor.

    The check reads each tensor once (cheap next to loading it: ~30 ms for the 29 M-parameter VRE);
    it is not applied to the multi-GB SD base model.

    Raises:
        ModelFileError: naming ``source`` and the first key (in file order) that is not a string,
            not a tensor, not floating point, or holds NaN / Inf.
    """
    import torch

    from .model_limits import first_nonfinite_key

    for k, v in sd.items():
        if not isinstance(k, str):
            raise ModelFileError(f"{source}: {what} key {k!r:.60} is not a string")
        if not isinstance(v, torch.Tensor):
            raise ModelFileError(f"{source}: '{k}' is a {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            raise ModelFileError(f"{source}: '{k}' has dtype {v.dtype}; {what} weights must be floating point")
    bad = first_nonfinite_key(sd)
    if bad is not None:
        raise ModelFileError(f"{source}: '{bad}' contains NaN or Inf values; the {what} file is broken")


def load_official_vre_state_dict(path: str | os.PathLike, expected: dict | None = None):
    """Read ``associate_2.ckpt``: keep ``vqvae_LQ.*`` minus the decoder, strip the prefix (docs/method.md §3.1).

    ``vqvae_LQ.post_quant_conv.*`` (kept by the official filter, ignored there by ``strict=False``)
    is dropped here explicitly. The kept tensors must be finite floating-point tensors. With
    ``expected`` (the model's state dict), keys and shapes are checked strictly.

    Raises:
        WeightsNotFoundError: no such file.
        UnsafeCheckpointError: the file references code.
        ModelFileError: unreadable or implausible file, no ``vqvae_LQ.*`` tensors, bad values,
            key/shape mismatch; the message names the file (and the key).
    """
    from .io.state_dicts import check_state_dict
    from .safe_load import load_torch_checkpoint

    path = Path(path)
    ckpt = load_torch_checkpoint(path)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ModelFileError(f"{path}: expected a checkpoint dict with a 'state_dict' entry, "
                             f"found {type(ckpt if sd is None else sd).__name__}")
    prefix = OFFICIAL_VRE_PREFIX
    out = {
        k[len(prefix):]: v
        for k, v in sd.items()
        if isinstance(k, str)
        and k.startswith(prefix)
        and not k.startswith(prefix + "decoder")
        and not k.startswith(prefix + "post_quant_conv")
    }
    if not out:
        raise ModelFileError(f"{path}: no '{prefix}*' tensors found; is this the OSDFace {OFFICIAL_VRE_FILE}?")
    check_release_tensors(path, out, "VRE")
    if expected is not None:
        check_state_dict(out, expected, path, VRE_WHAT)
    return out


def load_official_vre(path: str | os.PathLike, vre_config: dict | None = None):
    """A :class:`~osdface.models.VisualPromptEncoder` from an ``associate_2.ckpt``-layout file.

    The file is read once; the architecture comes from ``vre_config`` or, by default, from the
    tensor shapes (``infer_vre_config``: the released architecture for the released file, within
    ``VRE_BOUNDS``). Keys and shapes are checked strictly against a ``meta``-device skeleton
    *before* the real model is allocated, so the model is never larger than the file's tensors.

    Raises:
        WeightsNotFoundError, UnsafeCheckpointError, ModelFileError: see
            :func:`load_official_vre_state_dict`; also implausible architectures (key, shape, bound).
    """
    import torch

    from .io.state_dicts import check_state_dict
    from .models.prompt_encoder import VisualPromptEncoder, infer_vre_config

    path = Path(path)
    sd = load_official_vre_state_dict(path)
    if vre_config is None:
        try:
            vre_config = infer_vre_config(sd)
        except ValueError as e:
            raise ModelFileError(f"{path}: {e}") from None
        try:
            with torch.device("meta"):
                skeleton = VisualPromptEncoder(**vre_config)
        except (ValueError, RuntimeError) as e:  # e.g. widths GroupNorm(32) cannot split
            raise ModelFileError(f"{path}: the VRE architecture read from its tensor shapes cannot be built ({e})") from None
    else:
        with torch.device("meta"):
            skeleton = VisualPromptEncoder(**vre_config)
    check_state_dict(sd, skeleton.state_dict(), path, VRE_WHAT)
    vre = VisualPromptEncoder(**vre_config)
    vre.load_state_dict(sd, strict=True)
    return vre


def load_official_adapter_state_dict(path: str | os.PathLike, expected: dict | None = None):
    """Read ``embedding_change_weights.pth`` (a plain 4-tensor state dict of finite float tensors).

    Raises:
        WeightsNotFoundError, UnsafeCheckpointError, ModelFileError: as
            :func:`load_official_vre_state_dict`.
    """
    from .io.state_dicts import check_state_dict
    from .safe_load import load_torch_checkpoint

    path = Path(path)
    sd = load_torch_checkpoint(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelFileError(f"{path}: expected a state dict of tensors, found {type(sd).__name__}")
    check_release_tensors(path, sd, "prompt adapter")
    if expected is not None:
        check_state_dict(sd, expected, path, ADAPTER_WHAT)
    return dict(sd)


def load_lora_file(path: str | os.PathLike) -> dict:
    """Read a LoRA ``.safetensors`` file (memory-mapped); its tensors must be finite floats.

    Raises:
        WeightsNotFoundError: no such file.
        ModelFileError: not a valid safetensors file, or a non-float / non-finite tensor (key named).
    """
    from .safe_load import load_safetensors

    sd = load_safetensors(path, what="LoRA")
    check_release_tensors(Path(path), sd, "LoRA")
    return sd


__all__ = [
    "BASE_MODEL_SUBFOLDERS", "OFFICIAL_ADAPTER_FILE", "OFFICIAL_FILES", "OFFICIAL_LORA_FILE", "OFFICIAL_VRE_FILE",
    "OFFICIAL_WEIGHTS_HELP", "OfficialFiles", "WeightsNotFoundError", "check_base_model_dir", "check_release_tensors",
    "default_base_model_dir", "default_model_dir", "default_official_dir", "find_official_files",
    "load_lora_file", "load_official_adapter_state_dict", "load_official_vre", "load_official_vre_state_dict",
    "osdface_home",
]


# ------------------------------------------------------------------------- first run: what is missing
#: The SD 2.1-base files OSDFace reads: ``(subfolder, file, size of the fp32 release file)``, in the
#: diffusers layout of ``stabilityai/stable-diffusion-2-1-base`` (text encoder and tokenizer not needed).
BASE_MODEL_FILES = (
    ("scheduler", "scheduler_config.json", "< 1 KB"),
    ("unet", "config.json", "< 1 KB"),
    ("unet", "diffusion_pytorch_model.safetensors", "3.46 GB"),
    ("vae", "config.json", "< 1 KB"),
    ("vae", "diffusion_pytorch_model.safetensors", "335 MB"),
)

BASE_MODEL_FETCH_HELP = (
    "To fetch only these files from a mirror of stabilityai/stable-diffusion-2-1-base (the repository left "
    "the Hugging Face hub in 2025; ModelScope and hub mirrors carry copies): "
    "HF_ENDPOINT=<mirror URL> huggingface-cli download <mirror repo id> " + " ".join(
        f"{sub}/{name}" for sub, name, _ in BASE_MODEL_FILES) + " --local-dir <SD_DIR>. "
    "Check them with `osdface weights check <SD_DIR>` before a long job."
)


def _has_weights(folder: Path) -> bool:
    """A diffusers weights file (safetensors, sharded, or a download's ``.bin``) is in ``folder``."""
    if not folder.is_dir():
        return False
    return any(folder.glob("diffusion_pytorch_model*.safetensors")) or any(folder.glob("diffusion_pytorch_model*.bin"))


def missing_base_model_files(base_model: str | os.PathLike) -> list[str]:
    """The :data:`BASE_MODEL_FILES` missing from an SD 2.1-base folder, as ``"sub/file (size)"``.

    A weights file counts as present in any diffusers form (``.safetensors``, sharded, ``.bin``).
    Touches only the file system: no torch, no diffusers.
    """
    base = Path(base_model).expanduser()
    out = []
    for sub, name, size in BASE_MODEL_FILES:
        present = _has_weights(base / sub) if name.startswith("diffusion_pytorch_model") else (base / sub / name).is_file()
        if not present:
            out.append(f"{sub}/{name} ({size})")
    return out


def require_model_weights(model: str | os.PathLike | None = None, base_model: str | os.PathLike | None = None,
                          weights: str | os.PathLike | None = None) -> None:
    """Fail fast, before torch is imported, when the model weights are not there.

    Mirrors how the CLI chooses its weights: ``model`` (a model folder), else ``base_model`` +
    ``weights``, else ``$OSDFACE_HOME/model/`` when it holds a model folder, else
    ``$OSDFACE_HOME/stable-diffusion-2-1-base/`` + ``$OSDFACE_HOME/OSDFace/``. Only file names are
    checked here; contents are checked by the loaders (and by ``osdface weights check``).

    Raises:
        WeightsNotFoundError: one message listing **every** missing file (SD 2.1-base subfolder,
            file name and size; the OSDFace release files) and how to fetch them.
    """
    if model is not None:
        m = Path(model).expanduser()
        if not m.is_dir():
            raise WeightsNotFoundError(f"--model {m}: no such folder (an `osdface convert` model folder)")
        return
    if base_model is None and weights is None and (default_model_dir() / MODEL_INDEX).is_file():
        return
    base = Path(base_model).expanduser() if base_model is not None else default_base_model_dir()
    official = Path(weights).expanduser() if weights is not None else default_official_dir()
    missing_base = missing_base_model_files(base)
    missing_official = [name for name in OFFICIAL_FILES if not (official / name).is_file()]
    if not (missing_base or missing_official):
        return
    lines = ["OSDFace weights are missing:"]
    if missing_base:
        lines.append(f"  Stable Diffusion 2.1-base folder {base}/ needs:")
        lines += [f"    {m}" for m in missing_base]
    if missing_official:
        lines.append(f"  OSDFace release folder {official}/ needs: {', '.join(missing_official)}")
    lines.append(BASE_MODEL_FETCH_HELP if missing_base else "")
    lines.append(OFFICIAL_WEIGHTS_HELP)
    if base_model is None and weights is None:
        lines.append(f"Or pass --base-model SD_DIR --weights OSDFACE_DIR, or --model MODEL_DIR; "
                     f"OSDFACE_HOME moves the default folder ({osdface_home()}).")
    raise WeightsNotFoundError("\n".join(line for line in lines if line))
