"""Facial-identity loss ``L_ID = 1 − cos(F(gt), F(pred))`` (docs/method.md §6.2c) with a pluggable network F.

``F`` is any frozen module mapping ``(B, 3, H, W)`` RGB in [0, 1] to ``(B, D)`` embeddings.
:func:`build_identity_network` makes the ones of :mod:`osdface.models.identity`, each with its
own input preprocessing, from **local** weight files (nothing is downloaded):

=============== ================================================================== ==========================
backend         network / preprocessing                                            weights
=============== ================================================================== ==========================
``arcface``     ArcFace ResNet-18 (arcface-pytorch ``resnet_face18``, the Deg       ``arcface_resnet18.pth`` /
                metric's network), luminance → bilinear 128² → [-1, 1] (GFPGAN)     ``resnet18_110.pth`` (user)
``iresnet50``,  insightface iResNet, RGB bilinear 112² → [-1, 1]                    insightface ``backbone.pth``
``iresnet100``                                                                      (user)
``facenet``     FaceNet InceptionResnetV1, RGB 160² standardised (offline backend)  ``osdface weights install``
=============== ================================================================== ==========================

The paper uses an ArcFace (which checkpoint is unknown); ``arcface`` is the spec's [OURS]
choice. ``pretrained=False`` builds the same network with random weights (tests, tiny runs).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..io.networks import IDENTITY_BACKENDS, build_identity_net

#: FaceNet's face box in an FFHQ-aligned crop (x0, y0, x1, y1 fractions; = the ``ids_facenet`` metric's).
FFHQ_FACENET_BOX = (0.1875, 0.25, 0.8125, 0.875)


class IdentityNetwork(nn.Module):
    """A frozen face-recognition network with its preprocessing: ``(B, 3, H, W)`` [0, 1] → ``(B, D)``.

    Always in eval mode (its BatchNorm/dropout never switch to training with the owner).
    Differentiable w.r.t. the input.
    """

    def __init__(self, backend: str, net: nn.Module):
        super().__init__()
        self.backend = backend
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        from ..models.identity import arcface_preprocess, facenet_preprocess

        if self.backend == "arcface":
            return arcface_preprocess(x)  # (B, 1, 128, 128) in [-1, 1]
        if self.backend == "facenet":
            # the face box of an FFHQ-aligned crop, as the evaluation's FaceNet identity metric
            h, w = x.shape[-2:]
            x0, y0, x1, y1 = FFHQ_FACENET_BOX
            x = x[..., round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)]
            return facenet_preprocess(x)  # (B, 3, 160, 160) standardised
        x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
        return x * 2 - 1  # (B, 3, 112, 112) in [-1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"identity network: expected (B, 3, H, W) RGB in [0, 1], got {tuple(x.shape)}")
        return self.net(self.preprocess(x))


def build_identity_network(backend: str = "arcface", weights: str | os.PathLike | None = None,
                           weights_dir: str | os.PathLike | None = None, pretrained: bool = True) -> IdentityNetwork:
    """Build a frozen identity network.

    Args:
        backend: one of :data:`IDENTITY_BACKENDS`.
        weights: the weight file (``.pth`` read without executing code, or ``.safetensors``).
            Default: the backend's file in the metrics weights folder (``arcface``, ``facenet``).
        weights_dir: metrics weights folder (default ``$OSDFACE_HOME/metrics``).
        pretrained: ``False`` → random weights, no file read.

    Raises:
        InvalidSettingError: unknown ``backend``.
        WeightsNotFoundError: the weight file is missing (the message names it and where it goes).
        ModelFileError, UnsafeCheckpointError: a malformed file or one of another network (named).
    """
    return IdentityNetwork(backend, build_identity_net(backend, weights, weights_dir, pretrained))


class IdentityLoss(nn.Module):
    """``mean_b [1 − cos(F(target_b), F(pred_b))]``; the target embedding is computed under ``no_grad``.

    Args:
        network: a frozen :class:`IdentityNetwork` (or any ``(B, 3, H, W) [0, 1] → (B, D)`` module).

    ``forward(pred, target)``: ``(B, 3, H, W)`` RGB in [0, 1] each → 0-d tensor in [0, 2].
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"IdentityLoss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        with torch.no_grad():
            ref = self.network(target).float()  # (B, D)
        emb = self.network(pred).float()  # (B, D)
        return (1 - F.cosine_similarity(emb, ref, dim=1, eps=1e-8)).mean()


__all__ = ["IdentityLoss", "IdentityNetwork", "build_identity_network", "IDENTITY_BACKENDS"]
