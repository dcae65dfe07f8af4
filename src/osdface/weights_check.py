"""``osdface weights check DIR`` / ``list``: verify downloaded model files before a long job.

Every file's name and size; the SD 2.1-base UNet and VAE tensor keys and shapes (read from the
safetensors headers, no tensor data) against the modules their configs declare (built on the
``meta`` device); the OSDFace VRE and prompt adapter keys and shapes (as the loaders check them);
the LoRA against the SD 2.1-base UNet. Sits above :mod:`osdface.weights` and
:mod:`osdface.io.model_folders` (which imports :mod:`osdface.weights`), reusing both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import OSDFaceError, WeightsNotFoundError, first_line
from .io.names import BASE_MODEL_SUBFOLDERS, MODEL_INDEX, OFFICIAL_FILES, OFFICIAL_VRE_FILE
from .weights import BASE_MODEL_FILES, _has_weights, load_lora_file, load_official_vre


@dataclass(frozen=True)
class FileCheck:
    """One line of ``osdface weights check`` / ``list``: ``path``, ``size`` in bytes (``None``:
    missing), ``status`` (``"ok"``, ``"missing"`` or ``"error"``) and ``detail``."""

    path: Path
    size: int | None
    status: str
    detail: str = ""


def _header_shapes(file: Path) -> dict:
    """Keys → meta tensors of a safetensors file's shapes (the header only; no tensor data read)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as st:
        return {k: torch.empty(st.get_slice(k).get_shape(), device="meta") for k in st.keys()}


def _check_module_file(folder: Path, name: str, cfg: dict, what: str) -> FileCheck:
    """Keys and shapes of ``folder/name``'s safetensors weights against the module its config builds
    (on the ``meta`` device)."""
    import torch

    from .io.model_folders import _component_class
    from .io.state_dicts import check_state_dict

    files = sorted((folder / name).glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        bins = sorted((folder / name).glob("diffusion_pytorch_model*.bin"))
        if bins:
            return FileCheck(bins[0], bins[0].stat().st_size, "ok", "present (.bin: keys checked when loading)")
        return FileCheck(folder / name / "diffusion_pytorch_model.safetensors", None, "missing")
    got: dict = {}
    for f in files:
        got.update(_header_shapes(f))
    with torch.device("meta"):
        module = _component_class(name).from_config(cfg)
    check_state_dict(got, module.state_dict(), files[0], what)
    return FileCheck(files[0], sum(f.stat().st_size for f in files), "ok", f"{len(got)} tensors, keys and shapes match")


def _check(path: Path, run) -> FileCheck:
    """Run one check; user-fixable problems (:class:`OSDFaceError`) become an ``error`` line."""
    try:
        return run()
    except OSDFaceError as e:
        return FileCheck(path, path.stat().st_size if path.is_file() else None,
                         "missing" if isinstance(e, WeightsNotFoundError) else "error", first_line(e))


def check_base_model_files(base: Path) -> list[FileCheck]:
    """The SD 2.1-base folder: every file of :data:`BASE_MODEL_FILES`, configs within bounds, UNet and
    VAE tensor keys and shapes against the modules their configs declare."""
    from .io.model_folders import check_base_model
    from .io.names import SCHEDULER, UNET, VAE

    out = [FileCheck(base / sub / name, None, "missing", size) for sub, name, size in BASE_MODEL_FILES
           if not ((base / sub).is_dir() and (_has_weights(base / sub) if name.startswith("diffusion")
                                               else (base / sub / name).is_file()))]
    if out:
        return out
    checked = _check(base, lambda: check_base_model(base, safetensors_only=False))
    if isinstance(checked, FileCheck):
        return [checked]
    res = [FileCheck(base / SCHEDULER / "scheduler_config.json", (base / SCHEDULER / "scheduler_config.json").stat().st_size,
                     "ok", "config within bounds")]
    for name, what in ((UNET, "the SD 2.1-base UNet"), (VAE, "the SD 2.1-base VAE")):
        res.append(_check(base / name, lambda n=name, w=what: _check_module_file(base, n, checked.configs[n], w)))
    return res


def check_official_files(official: Path, cross_attention_dim: int = 1024, unet_config: dict | None = None
                         ) -> list[FileCheck]:
    """The three release files: present, readable, finite, keys and shapes as the model expects
    (the VRE strictly against its architecture, the adapter ``embed_dim → cross_attention_dim``, the
    LoRA against the UNet of ``unet_config`` when given, else its pairs and ranks only)."""
    from .io.model_folders import read_official_adapter

    res = []
    vre_path, ad_path, lora_path = (official / n for n in OFFICIAL_FILES)
    vre_box: dict = {}

    def vre():
        v = load_official_vre(vre_path)
        vre_box["embed_dim"] = v.config.embed_dim
        n = sum(p.numel() for p in v.parameters())
        return FileCheck(vre_path, vre_path.stat().st_size, "ok", f"VRE keys and shapes match ({n / 1e6:.1f} M parameters)")

    def adapter():
        if "embed_dim" not in vre_box:
            return FileCheck(ad_path, ad_path.stat().st_size, "error", f"not checked: {OFFICIAL_VRE_FILE} failed")
        read_official_adapter(ad_path, vre_box["embed_dim"], cross_attention_dim)
        return FileCheck(ad_path, ad_path.stat().st_size, "ok",
                         f"adapter {vre_box['embed_dim']} -> {cross_attention_dim} keys and shapes match")

    def lora():
        from .models.lora import _check_lora_fits, parse_lora_state_dict

        sd = load_lora_file(lora_path)
        parsed = parse_lora_state_dict(sd)
        if unet_config is None:
            return FileCheck(lora_path, lora_path.stat().st_size, "ok",
                             f"{len(sd)} tensors in A/B pairs (no SD 2.1-base config here to check the modules)")
        import torch

        from .io.model_folders import _component_class

        with torch.device("meta"):
            unet = _component_class("unet").from_config(unet_config)
        _check_lora_fits(unet, parsed, str(lora_path))
        return FileCheck(lora_path, lora_path.stat().st_size, "ok", f"{len(sd)} tensors fit the SD 2.1-base UNet")

    for path, run in ((vre_path, vre), (ad_path, adapter), (lora_path, lora)):
        res.append(_check(path, run) if path.is_file() else FileCheck(path, None, "missing"))
    return res


def check_model_folder_files(root: Path) -> list[FileCheck]:
    """A model folder (``osdface convert``): every config and header (:func:`read_model_folder`),
    then each component's tensor keys and shapes against its config."""
    from .io.model_folders import WHAT, read_model_folder
    from .io.names import WEIGHTED_COMPONENTS

    folder = _check(root / MODEL_INDEX, lambda: read_model_folder(root))
    if isinstance(folder, FileCheck):
        return [folder]
    return [_check(root / name, lambda n=name: _check_module_file(root, n, folder.configs[n], WHAT[n]))
            for name in WEIGHTED_COMPONENTS]


def check_weights_dir(path: str | os.PathLike) -> list[FileCheck]:
    """``osdface weights check DIR``: recognise what ``DIR`` is and check every file of it.

    ``DIR`` may be a model folder (``model_index.json``), an SD 2.1-base folder (``unet/``,
    ``vae/``, ``scheduler/``), an OSDFace release folder (its three files), or an osdface home
    holding ``stable-diffusion-2-1-base/`` and ``OSDFace/`` (both checked, the LoRA against that
    UNet).

    Raises:
        WeightsNotFoundError: ``DIR`` does not exist or is none of these.
    """
    import json

    d = Path(path).expanduser()
    if not d.is_dir():
        raise WeightsNotFoundError(f"{d}: no such folder")
    if (d / MODEL_INDEX).is_file():
        return check_model_folder_files(d)
    base = d / "stable-diffusion-2-1-base" if (d / "stable-diffusion-2-1-base").is_dir() else None
    official = d / "OSDFace" if (d / "OSDFace").is_dir() else None
    if base is None and any((d / sub).is_dir() for sub in BASE_MODEL_SUBFOLDERS):
        base = d
    if official is None and any((d / n).is_file() for n in OFFICIAL_FILES):
        official = d
    if base is None and official is None:
        raise WeightsNotFoundError(
            f"{d}: not a model folder ({MODEL_INDEX}), an SD 2.1-base folder (scheduler/, unet/, vae/), "
            f"an OSDFace release folder ({', '.join(OFFICIAL_FILES)}) or an osdface home holding them")
    res: list[FileCheck] = []
    unet_cfg = None
    if base is not None:
        res += check_base_model_files(base)
        try:
            unet_cfg = json.loads((base / "unet" / "config.json").read_text())
        except (OSError, ValueError):
            unet_cfg = None
    if official is not None:
        cross = unet_cfg.get("cross_attention_dim", 1024) if isinstance(unet_cfg, dict) else 1024
        ok = all(c.status == "ok" for c in res)
        res += check_official_files(official, cross, unet_cfg if ok else None)
    return res
