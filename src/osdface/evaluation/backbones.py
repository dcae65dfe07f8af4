"""The field's metric networks, built from local weight files (never downloaded).

* LPIPS: the ``lpips`` package's :class:`lpips.LPIPS` (v0.1) with its trunk built random
  (``pnet_rand=True``, which never downloads) and then *all* weights loaded from
  ``lpips_{alex,vgg}.safetensors`` (see :mod:`osdface.evaluation.weights`).
* DISTS: ``DISTS_pytorch.DISTS`` — its ``forward``/``forward_once`` and ``L2pooling`` are used
  unchanged; only the constructor is re-done so that the VGG16 trunk is built with
  ``weights=None`` instead of being downloaded, then the weights come from ``dists_vgg16.safetensors``.
* FID Inception: ``pytorch_fid.inception.InceptionV3`` (pool3, 2048-d, bilinear resize to 299,
  [0,1]→[-1,1]) whose ``fid_inception_v3()`` is replaced, for the duration of the constructor,
  by an identical builder that loads ``fid_inception_v3.safetensors`` instead of downloading.

``pretrained=False`` builds the same networks with random weights and reads no file (tests,
tiny training runs). All builders return modules in eval mode with frozen parameters.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch import nn

from ..utils.logging import get_logger

logger = get_logger(__name__)

_PATCH_LOCK = threading.Lock()

LPIPS_NETS = ("alex", "vgg")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


#: container keys released checkpoints wrap their tensors in (BasicSR, Lightning, pyiqa, IIGROUP, ...)
CONTAINER_KEYS = ("state_dict", "params_ema", "params", "model", "net")


def unwrap_state_dict(obj, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor dict of a released checkpoint: unwraps (nested) :data:`CONTAINER_KEYS` containers and
    strips DataParallel ``module.`` prefixes.

    Raises:
        ValueError: naming ``source`` when no dict of tensors is found.
    """
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not any(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{source}: no state dict of tensors found in the file")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_checked(model: nn.Module, sd: dict[str, torch.Tensor], source: str | os.PathLike, what: str,
                 may_be_missing=lambda key: False, hint: str = "") -> nn.Module:
    """Load ``sd`` into ``model`` after a strict key/shape check.

    Args:
        what: what the file should be (for the message), e.g. ``"a MUSIQ (KonIQ) checkpoint"``.
        may_be_missing: keys that may be absent (the model keeps its own values), e.g. BatchNorm
            ``num_batches_tracked`` of old files or layers a metric does not use.
        hint: appended to the error message.

    Raises:
        ValueError: naming ``source`` and the first missing / unexpected / wrongly shaped entries.
    """
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd and not may_be_missing(k))
    unexpected = sorted(k for k in sd if k not in own)
    wrong = sorted(f"{k} {tuple(getattr(sd[k], 'shape', ()))} != {tuple(own[k].shape)}" for k in sd
                   if k in own and (not torch.is_tensor(sd[k]) or tuple(sd[k].shape) != tuple(own[k].shape)))
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: not {what}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatch {wrong[:5]}{hint}")
    model.load_state_dict({**{k: v for k, v in own.items() if k not in sd}, **sd}, strict=True)
    return model


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: Path, ignore: tuple[str, ...] = ()) -> None:
    load_checked(model, sd, source, "weights of this network", lambda k: k.startswith(ignore),
                 "; re-run `osdface weights install --force`")


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
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose from {list(LPIPS_NETS)}")
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated"
        model = lpips.LPIPS(pretrained=False, net=net, version="0.1", pnet_rand=True, verbose=False)
    if pretrained:
        from .weights import require_weight_file

        path = require_weight_file(f"lpips_{net}", weights_dir)
        _load_strict(model, _load_safetensors(path), path)
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
        from .weights import require_weight_file

        path = require_weight_file("dists", weights_dir)
        _load_strict(model, _load_safetensors(path), path)
    return freeze(model)


def build_fid_inception(weights_dir: str | os.PathLike | None = None, pretrained: bool = True):
    """``pytorch_fid.inception.InceptionV3([3])``: ``(B, 3, H, W)`` in [0, 1] → list with ``(B, 2048, 1, 1)``.

    The returned module has an ``inception_modules`` dict (name → module of the underlying
    ``fid_inception_v3()`` network) used by the weight installer to write the standard key layout.
    Accepts ``fid_inception_v3.safetensors`` or pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.
    """
    from unittest import mock

    from pytorch_fid import inception as pfi

    sd = None
    path = None
    if pretrained:
        from .weights import require_weight_file

        path = require_weight_file("fid_inception", weights_dir)
        if path.suffix == ".safetensors":
            sd = _load_safetensors(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    holder: dict[str, nn.Module] = {}

    def fid_inception_v3_local():
        # Identical to pytorch_fid.inception.fid_inception_v3, except the weights' source.
        inception = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        inception.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
        inception.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
        inception.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
        inception.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
        inception.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
        inception.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
        inception.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
        inception.Mixed_7b = pfi.FIDInceptionE_1(1280)
        inception.Mixed_7c = pfi.FIDInceptionE_2(2048)
        if sd is not None:
            # the 1008-way logits layer is not used for FID and may be absent from the file
            _load_strict(inception, sd, path, ignore=("fc.",))
        holder["inception"] = inception
        return inception

    with _PATCH_LOCK, mock.patch.object(pfi, "fid_inception_v3", fid_inception_v3_local):
        model = pfi.InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True)
    model.inception_modules = {
        name: m for name, m in holder["inception"].named_children() if name != "fc"
    }
    return freeze(model)
