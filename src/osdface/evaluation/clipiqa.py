"""CLIP-IQA, zero-shot no-reference quality from CLIP (higher is better).

Wang, Chan, Loy, "Exploring CLIP for Assessing the Look and Feel of Images", AAAI 2023. The score
of an image is the softmax probability of the *positive* prompt of an antonym pair, computed from
the cosine similarities between the CLIP image embedding and the two prompt embeddings. The
network is OpenAI's CLIP RN50 (Radford et al. 2021; built here with ``open_clip``'s
``RN50-quickgelu`` architecture and tokenizer, MIT licence). The protocol follows the
implementation behind the paper's numbers, pyiqa 0.1.12's default ``clipiqa``:

* backbone: CLIP RN50 with OpenAI's released weights (``RN50.pt``), evaluated in float32;
* prompts: five antonym pairs (:data:`PROMPT_PAIRS`), tokenised with CLIP's BPE (context 77);
  the score is the positive-prompt probability averaged over the five pairs;
* logits: ``exp(logit_scale) * <image_feature, text_feature>`` with both features L2-normalised
  (CLIP's own logits; ``logit_scale`` comes from the weight file, 100 for OpenAI's RN50);
* input: ``(B, 3, H, W)`` RGB in [0, 1] is normalised with OpenAI CLIP's mean / std and fed at its
  own size: **no resize, no crop**;
* attention pool: with the default ``pos_embedding=False`` the attention pool adds **no**
  positional embedding (so any input size works; the 7×7 + 1 table of the weight file is loaded but
  unused). ``pos_embedding=True`` adds the table resized along the token axis (bicubic,
  ``align_corners=False``) to the ``H/32 · W/32 + 1`` tokens;
* weights: OpenAI's ``clip.load`` casts convolution, linear and attention weights and the text
  projection to float16 before the CPU model is turned back to float32; we round the same
  tensors through float16 after loading (a no-op for the released file, whose tensors are already
  float16), so a float32 copy of the weights gives identical scores.

Weight files: OpenAI's ``RN50.pt`` is a TorchScript archive. It is **never** loaded with
``torch.jit.load`` (which would run code from the file): :func:`read_torchscript_state_dict` walks
the archive's ``data.pkl`` with a restricted unpickler (TorchScript classes become inert objects,
only tensors are kept) and names the tensors by the module hierarchy, keeping the parameters and
buffers that the archive's class declarations list (OpenAI's state-dict names). Plain state dicts
are accepted too: a ``torch.save`` file (read with ``weights_only``, e.g. open_clip's
``open_clip_pytorch_model.bin`` for RN50/openai) or a ``.safetensors`` file.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidSettingError, ModelFileError, WeightsNotFoundError
from ..image import ImageError
from ..io.networks import freeze, require_weight_file
from ..io.state_dicts import check_state_dict, unwrap_state_dict
from ..safe_load import InertObject, load_safetensors, load_torch_checkpoint, load_torchscript_data
from ..utils.logging import get_logger
from .base import Metric

logger = get_logger(__name__)

#: The antonym prompt pairs (positive, negative) of pyiqa's ``clipiqa`` (averaged, equal weights).
PROMPT_PAIRS: tuple[tuple[str, str], ...] = (
    ("Good image", "bad image"),
    ("Sharp image", "blurry image"),
    ("sharp edges", "blurry edges"),
    ("High resolution image", "low resolution image"),
    ("Noise-free image", "noisy image"),
)

#: OpenAI CLIP image normalisation (RGB in [0, 1]).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: open_clip architecture name of OpenAI's RN50 (QuickGELU activations, as trained by OpenAI).
CLIP_ARCH = "RN50-quickgelu"

#: Scalar buffers of OpenAI's TorchScript release that are not network weights (dropped on load).
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

#: Smallest image side the RN50 trunk accepts (its total stride is 32; 31 still gives one cell).
MIN_SIZE = 31


# ----------------------------------------------------------------------------------------------
# Reading weight files without executing code
# ----------------------------------------------------------------------------------------------


def _archive_prefix(zf: zipfile.ZipFile, source: str) -> str:
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise ModelFileError(f"{source}: not a PyTorch archive (no single data.pkl inside)")
    return pkl[0][: -len("data.pkl")]


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """``True`` if ``path`` is a TorchScript zip archive (``torch.jit.save``; has ``constants.pkl`` / ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "code/__torch__" in n for n in names)


_CLASS_RE = re.compile(r"^class (\w+)\(", re.M)


def _torchscript_declarations(zf: zipfile.ZipFile, prefix: str) -> dict[str, tuple[set[str], set[str] | None]]:
    """``{qualified class name: (parameter names, buffer names or None)}`` from the archive's code files.

    The ``code/`` files are TorchScript source; they are only *read as text* here (the
    ``__parameters__ = [...]`` / ``__buffers__ = [...]`` lines), never compiled or run.
    """
    decls: dict[str, tuple[set[str], set[str] | None]] = {}
    code = f"{prefix}code/"
    for name in zf.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code): -len(".py")].replace("/", ".")
        text = zf.read(name).decode("utf-8", errors="replace")
        starts = [(m.start(), m.group(1)) for m in _CLASS_RE.finditer(text)]
        for i, (start, cls) in enumerate(starts):
            block = text[start: starts[i + 1][0] if i + 1 < len(starts) else len(text)]
            params = re.search(r"^\s+__parameters__ = \[(.*?)\]", block, re.M)
            buffers = re.search(r"^\s+__buffers__ = \[(.*?)\]", block, re.M)
            if params is None:
                continue
            decls[f"{module}.{cls}"] = (
                set(re.findall(r'"([^"]*)"', params.group(1))),
                set(re.findall(r'"([^"]*)"', buffers.group(1))) if buffers else None,
            )
    return decls


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict of a TorchScript archive (e.g. OpenAI's ``RN50.pt``) read without executing its code.

    ``data.pkl`` is unpickled with osdface's restricted unpickler (:mod:`osdface.safe_load`) in
    which every TorchScript class (``__torch__.*``) is an inert data holder and any other global
    (``os.system``, ``builtins.eval``, ...) is refused. The module tree is then walked and its
    tensors are named ``submodule.….name`` like ``nn.Module.state_dict()``: for each module only the
    parameters and buffers declared in the archive's class definitions are kept (plain tensor
    attributes are not state). Tensors keep their stored dtype (OpenAI's file mixes float16 and
    float32) and are on the CPU.

    Records and tensors are checked as in :func:`osdface.safe_load.load_torch_checkpoint` (record
    sizes and compression, tensor layouts) before anything large is allocated.

    Raises:
        osdface.safe_load.UnsafeCheckpointError: the pickle references code.
        osdface.errors.ModelFileError: not a TorchScript archive of a module, or a malformed /
            implausible one (a ``ValueError``).
    """
    path = Path(path)
    if not is_torchscript_archive(path):
        raise ModelFileError(f"{path}: not a TorchScript archive")
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf, str(path))
            root = load_torchscript_data(zf, str(path))  # checks every record first
            decls = _torchscript_declarations(zf, prefix)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFileError(f"{path}: unreadable TorchScript archive ({e})") from None
    if not (isinstance(root, InertObject) and root._qualname.startswith("__torch__")):
        raise ModelFileError(f"{path}: the TorchScript archive does not hold a module (root is {type(root).__name__})")

    out: dict[str, torch.Tensor] = {}
    undeclared: set[str] = set()

    def walk(obj: InertObject, prefix_: str) -> None:
        state = obj.__dict__.get("_state")
        if not isinstance(state, dict):
            return
        params, buffers = decls.get(obj._qualname, (None, None))
        if params is None:
            undeclared.add(obj._qualname)
        for name, value in state.items():
            if isinstance(value, InertObject) and value._qualname.startswith("__torch__"):
                walk(value, f"{prefix_}{name}.")
            elif isinstance(value, torch.Tensor):
                if params is None or name in params or buffers is None or name in buffers:
                    out[f"{prefix_}{name}"] = value.detach()

    walk(root, "")
    if undeclared:
        logger.debug("%s: no declaration for %s; kept all their tensors", path, sorted(undeclared))
    return out


def load_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP weight file, with OpenAI's state-dict names (``visual.*``, ``transformer.*``, ...).

    Accepts OpenAI's TorchScript release (``RN50.pt``, read by :func:`read_torchscript_state_dict`),
    a ``torch.save`` state dict (``weights_only``; ``state_dict`` / ``model`` / ``params``
    containers and ``module.`` prefixes are unwrapped) or a ``.safetensors`` file (recognised by
    content, whatever its name). The metadata buffers :data:`OPENAI_METADATA_KEYS` are dropped.

    Raises:
        WeightsNotFoundError: no such file (a ``FileNotFoundError``).
        ModelFileError: an unreadable or malformed file (named, with the reason).
        UnsafeCheckpointError: a pickle that would run code.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such file")
    if is_torchscript_archive(path):
        sd = read_torchscript_state_dict(path)
    else:
        with open(path, "rb") as f:
            head = f.read(9)
        if not zipfile.is_zipfile(path) and len(head) == 9 and head[8:9] == b"{":
            sd = load_safetensors(path, what="CLIP weights")  # ModelFileError naming the file and the reason
        else:
            sd = unwrap_state_dict(load_torch_checkpoint(path), path)
    return {k: v for k, v in sd.items() if k not in OPENAI_METADATA_KEYS}


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


def _attention_pool_class():
    from open_clip.modified_resnet import AttentionPool2d

    class AttentionPoolNoPos(AttentionPool2d):
        """open_clip's CLIP attention pool whose positional embedding is optional (pyiqa's flag).

        ``use_pos_embedding=False``: the ``H·W + 1`` tokens (mean token first) get no positional
        embedding; ``True``: the ``(S² + 1, C)`` table is bicubically resized to ``(H·W + 1, C)``.
        """

        use_pos_embedding = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            x = x.reshape(n, c, h * w).permute(2, 0, 1)  # (HW, N, C)
            x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW + 1, N, C)
            if self.use_pos_embedding:
                pos = F.interpolate(self.positional_embedding[None, None], size=(x.shape[0], x.shape[2]),
                                    mode="bicubic", align_corners=False)[0, 0]
                x = x + pos[:, None, :].to(x.dtype)
            x, _ = F.multi_head_attention_forward(
                query=x, key=x, value=x,
                embed_dim_to_check=x.shape[-1],
                num_heads=self.num_heads,
                q_proj_weight=self.q_proj.weight,
                k_proj_weight=self.k_proj.weight,
                v_proj_weight=self.v_proj.weight,
                in_proj_weight=None,
                in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
                bias_k=None,
                bias_v=None,
                add_zero_attn=False,
                dropout_p=0.0,
                out_proj_weight=self.c_proj.weight,
                out_proj_bias=self.c_proj.bias,
                use_separate_proj_weight=True,
                training=self.training,
                need_weights=False,
            )
            return x[0]

    return AttentionPoolNoPos


def build_clip(arch: dict | None = None, pos_embedding: bool = False) -> nn.Module:
    """open_clip ``CLIP`` (QuickGELU) with the attention pool of :class:`CLIPIQAMetric`; random init.

    Args:
        arch: ``None`` → open_clip's ``RN50-quickgelu`` configuration (OpenAI's RN50). Otherwise ``{"embed_dim": int,
            "vision_cfg": {...}, "text_cfg": {...}}`` for ``open_clip.model.CLIP`` (ResNet vision
            tower: ``vision_cfg["layers"]`` a 4-tuple) — small configurations for tests.
        pos_embedding: see :class:`CLIPIQAMetric`.
    """
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if arch is None:
        arch = open_clip.get_model_config(CLIP_ARCH)  # the packaged JSON; nothing is downloaded
    model = CLIP(arch["embed_dim"], CLIPVisionCfg(**arch["vision_cfg"]), CLIPTextCfg(**arch["text_cfg"]),
                 quick_gelu=True)
    pool = model.visual.attnpool
    if not hasattr(pool, "q_proj"):
        raise InvalidSettingError("CLIP-IQA needs a ResNet (ModifiedResNet) vision tower")
    pool.__class__ = _attention_pool_class()
    pool.use_pos_embedding = bool(pos_embedding)
    return model


def openai_fp16_keys(model: nn.Module) -> list[str]:
    """State-dict keys that OpenAI's ``clip.load`` stores as float16 (conv / linear / attention weights
    and biases, ``text_projection``, ``proj``), in ``model.state_dict()`` order."""
    keys = []
    for mname, module in model.named_modules():
        pre = f"{mname}." if mname else ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names = ("weight", "bias")
        elif isinstance(module, nn.MultiheadAttention):
            names = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "bias_k", "bias_v")
        else:
            names = ()
        names += tuple(n for n in ("text_projection", "proj") if isinstance(getattr(module, n, None), torch.Tensor))
        keys += [pre + n for n in names if isinstance(getattr(module, n, None), torch.Tensor)]
    order = list(model.state_dict())
    return sorted(set(keys), key=order.index)


def load_clip_weights(model: nn.Module, sd: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load ``sd`` into ``model`` with a strict key / shape check, then round like OpenAI's ``clip.load``.

    Raises:
        ModelFileError: missing / unexpected / wrong-shape keys; the message names ``source`` and the
            first offending keys.
    """
    check_state_dict(sd, model.state_dict(), source, "a CLIP RN50 checkpoint of the expected layout")
    fp16 = set(openai_fp16_keys(model))
    # load_state_dict casts to the parameters' dtype; float16 tensors (the release) are exact already
    model.load_state_dict({k: v.half() if k in fp16 and v.dtype != torch.float16 else v for k, v in sd.items()},
                          strict=True)


# ----------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------


def _trunk_size(n: int) -> int:
    n = (n - 1) // 2 + 1  # stem conv 3x3 / 2, padding 1
    for _ in range(4):  # stem avg-pool, then the avg-pools of layer2..4
        n //= 2
    return n


class CLIPIQAMetric(Metric):
    """CLIP-IQA (pyiqa 0.1.12 ``clipiqa``): no reference, higher is better, scores in (0, 1).

    ``metric(pred)`` with ``pred`` ``(B, 3, H, W)`` RGB in [0, 1] (any device / float dtype;
    ``H, W >= 31``, any aspect, no resize) → ``(B,)`` float64 scores. Computed in float32 on
    ``device``, the whole batch at once. The text features of :data:`PROMPT_PAIRS` are computed
    once per instance (``text_features``, ``(10, D)`` unit rows).

    Args:
        device: torch device of the network.
        weights_dir: metrics weights folder holding ``RN50.pt`` (see :mod:`osdface.evaluation.weights`).
        pretrained: ``False`` → the same network with seeded random weights, no file read (tests).
        pos_embedding: pyiqa's flag; ``False`` (the ``clipiqa`` default) skips the attention pool's
            positional embedding, ``True`` resizes it to the token count.
        arch: open_clip CLIP configuration (see :func:`build_clip`); ``None`` = RN50 (the metric).
        seed: seed of the random weights when ``pretrained=False``.
    """

    name, full_reference, lower_better = "clipiqa", False, False

    def __init__(self, device="cpu", weights_dir=None, pretrained: bool = True, pos_embedding: bool = False,
                 arch: dict | None = None, seed: int = 0, **_):
        super().__init__(device)
        import open_clip

        path = None
        if pretrained:
            path = require_weight_file("clip_rn50", weights_dir)  # fail before building the network
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_clip(arch, pos_embedding=pos_embedding)
        if path is not None:
            load_clip_weights(model, load_clip_state_dict(path), path)
            logger.info("clipiqa: CLIP weights from %s", path)
        self.model = freeze(model.float().to(self.device))
        self.pos_embedding = bool(pos_embedding)

        tokenizer = open_clip.get_tokenizer(CLIP_ARCH)
        #: ``(10, 77)`` int64 token ids of the prompts (positive, negative, positive, ...).
        self.tokens = tokenizer([p for pair in PROMPT_PAIRS for p in pair])
        self.mean = torch.tensor(OPENAI_CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            t = self.model.encode_text(self.tokens.to(self.device)).float()
            self.text_features = t / t.norm(dim=-1, keepdim=True)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] → float32 CLIP input ``(x - mean) / std`` on ``device`` (same size)."""
        h, w = x.shape[-2:]
        if min(_trunk_size(h), _trunk_size(w)) < 1:
            raise ImageError(f"clipiqa: images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {w}x{h}")
        x = x.to(self.device, torch.float32)
        return (x - self.mean) / self.std

    def compute(self, pred: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        x = self.preprocess(pred)
        f = self.model.encode_image(x).float()
        f = f / f.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp() * f @ self.text_features.t()  # (B, 10)
        probs = logits.reshape(logits.shape[0], -1, 2).softmax(dim=-1)
        return probs[..., 0].mean(dim=1)


__all__ = [
    "CLIPIQAMetric",
    "PROMPT_PAIRS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "build_clip",
    "load_clip_state_dict",
    "load_clip_weights",
    "openai_fp16_keys",
    "read_torchscript_state_dict",
    "is_torchscript_archive",
]
