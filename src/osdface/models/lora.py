"""LoRA for the UNet: read the official/PEFT key formats, merge into base weights, or attach via peft.

Formats (docs/method.md §3.2):

* **PEFT / diffusers** (the release): ``unet.<module>.lora_A.weight`` ``(r, in[, kh, kw])`` and
  ``unet.<module>.lora_B.weight`` ``(out, r[, 1, 1])``; optionally ``<module>.alpha`` scalars.
* **Old diffusers "LoRACompatible"**: ``<module>.lora.down.weight`` / ``<module>.lora.up.weight``.

Merging is ``W ← W + s · B @ A`` (convolutions reshaped), with ``s = alpha / r`` (1.0 for the
release: rank 16, alpha 16), computed in float32 on the weights' device, exactly like the
official ``merge_Unet``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import OSDFaceError
from ..io.names import LORA_KEY_PREFIX
from ..utils.logging import get_logger

logger = get_logger(__name__)

#: LoRA targets used when training a generator from scratch (OSEDiff's UNet list; docs/method.md §4 [OURS]).
DEFAULT_UNET_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv",
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv_out",
)


class LoraFormatError(OSDFaceError, ValueError):
    """A LoRA state dict that cannot be mapped onto the model; the message lists the keys."""


@dataclass
class LoraPair:
    """One adapted module: ``down`` (A) ``(r, in[, kh, kw])`` and ``up`` (B) ``(out, r[, 1, 1])``."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class ParsedLora:
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    unprocessed: list[str] = field(default_factory=list)


_PATTERNS = (
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.lora\.down\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+)\.lora\.up\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
)


def parse_lora_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = LORA_KEY_PREFIX,
                          source: str = "LoRA state dict") -> ParsedLora:
    """Group LoRA tensors by target module, stripping ``prefix`` (``"unet."``) from module paths.

    Keys ending in ``lora_A.<adapter>.weight`` (peft's in-model naming) are accepted as well.
    Keys that match no known pattern, and halves without their partner, end up in
    ``unprocessed``.

    Raises:
        LoraFormatError: an ``.alpha`` entry that is not one finite number (naming ``source``).
    """
    parts: dict[str, dict[str, object]] = {}
    parsed = ParsedLora()
    for key, value in state_dict.items():
        for pattern, role in _PATTERNS:
            m = pattern.match(key)
            if m:
                module = m.group("m")
                if prefix and module.startswith(prefix):
                    module = module[len(prefix) :]
                parts.setdefault(module, {})[role] = value
                parts[module].setdefault("_keys", []).append(key)  # type: ignore[union-attr]
                break
        else:
            parsed.unprocessed.append(key)
    for module, p in parts.items():
        if "down" in p and "up" in p:
            parsed.pairs[module] = LoraPair(module, p["down"], p["up"], _alpha_value(p.get("alpha"), module, source))
        else:
            parsed.unprocessed.extend(p["_keys"])  # type: ignore[arg-type]
    return parsed


def _alpha_value(alpha, module: str, source: str) -> float | None:
    """A module's ``.alpha`` entry → float; ``None`` when absent."""
    if alpha is None:
        return None
    if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1:
        shape = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise LoraFormatError(f"{source}: {module}.alpha must be a single number, got {shape}")
    value = float(alpha.item())
    if not math.isfinite(value):
        raise LoraFormatError(f"{source}: {module}.alpha is {value}")
    return value


def lora_delta(pair: LoraPair, weight_shape: torch.Size) -> torch.Tensor:
    """``B @ A`` reshaped to ``weight_shape`` (float32).

    ``A`` is ``(r, in[, kh, kw])`` and ``B`` ``(out, r[, 1, 1])`` with ``r >= 1``; anything else
    raises :class:`LoraFormatError` naming the module.
    """
    _check_pair_shape(pair, weight_shape)
    a, b, r = pair.down.float(), pair.up.float(), pair.rank
    if len(weight_shape) == 4:
        out_ch, in_ch, kh, kw = weight_shape
        return torch.matmul(b.view(out_ch, r), a.view(r, -1)).view(out_ch, in_ch, kh, kw)
    return torch.mm(b, a)


def resolve_scale(pair: LoraPair, lora_alpha: float | None, rank: int | None) -> float:
    """``alpha / r``: a per-module ``.alpha`` entry wins, then the given ``lora_alpha``; default alpha = r."""
    alpha = pair.alpha if pair.alpha is not None else (lora_alpha if lora_alpha is not None else pair.rank)
    return float(alpha) / float(rank if rank is not None else pair.rank)


@torch.no_grad()
def merge_lora_into(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    lora_alpha: float | None = None,
    prefix: str = LORA_KEY_PREFIX,
    source: str = "LoRA state dict",
) -> list[str]:
    """Merge a LoRA state dict into ``model``'s weights in place; return the merged module names.

    Raises:
        LoraFormatError: a key that cannot be mapped (unknown format, no such module, wrong shape),
            or no LoRA weights at all. The message names ``source`` and lists the offending keys,
            and nothing is modified.
    """
    parsed = parse_lora_state_dict(state_dict, prefix=prefix, source=source)
    modules = _check_lora_fits(model, parsed, source)
    deltas = {}
    for name, pair in parsed.pairs.items():
        weight = modules[name].weight
        deltas[name] = lora_delta(pair, weight.shape) * resolve_scale(pair, lora_alpha, None)
    for name, delta in deltas.items():  # apply only after every pair was validated
        weight = modules[name].weight
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    logger.info("merged LoRA into %d modules from %s", len(deltas), source)
    return sorted(deltas)


def _check_lora_fits(model: nn.Module, parsed: ParsedLora, source: str) -> dict[str, nn.Module]:
    """Every pair maps onto a module with a ``weight`` of a fitting shape; returns the model's modules.

    Raises:
        LoraFormatError: naming ``source``, listing unrecognised keys, modules the model lacks and
            shape mismatches (up to 20 of each); also for a state dict without any LoRA pair.
    """
    modules = dict(model.named_modules())
    missing = [m for m in parsed.pairs if m not in modules or not hasattr(modules[m], "weight")]
    problems = []
    if parsed.unprocessed:
        problems.append(f"unrecognised keys: {sorted(parsed.unprocessed)[:20]}")
    if missing:
        problems.append(f"no matching module in the model for: {sorted(missing)[:20]}")
    if not parsed.pairs and not problems:
        problems.append("no LoRA weights in it")
    shape_errors = []
    for name, pair in parsed.pairs.items():
        if name in missing:
            continue
        try:
            _check_pair_shape(pair, modules[name].weight.shape)
        except LoraFormatError as e:
            shape_errors.append(str(e))
    if shape_errors:
        problems.append("wrong shapes: " + "; ".join(shape_errors[:20]))
    if problems:
        raise LoraFormatError(f"{source}: cannot map LoRA weights; " + "; ".join(problems))
    return modules


def _check_pair_shape(pair: LoraPair, weight_shape: torch.Size) -> None:
    """:func:`lora_delta`'s shape rules without computing the product."""
    a, b = pair.down, pair.up
    if a.ndim not in (2, 4) or b.ndim != a.ndim or a.shape[0] < 1 or b.shape[1] != a.shape[0]:
        raise LoraFormatError(f"{pair.module}: LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} are not a rank-r "
                              "pair (A (r, in[, kh, kw]), B (out, r[, 1, 1]))")
    r = a.shape[0]
    if len(weight_shape) == 4 and a.shape == (r, *weight_shape[1:]) and b.shape == (weight_shape[0], r, 1, 1):
        return
    if len(weight_shape) == 2 and a.ndim == 2 and a.shape[1] == weight_shape[1] and b.shape[0] == weight_shape[0]:
        return
    raise LoraFormatError(f"{pair.module}: LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit weight "
                          f"{tuple(weight_shape)}")


def lora_config_from_state_dict(state_dict: dict[str, torch.Tensor], lora_alpha: float | None = None, prefix: str = LORA_KEY_PREFIX,
                                source: str = "LoRA state dict"):
    """A ``peft.LoraConfig`` that reproduces the adapter described by ``state_dict``.

    Target modules are the exact module paths found, the rank is read from the tensors and
    ``lora_alpha`` defaults to the rank (scale 1.0), as diffusers does for files without alphas.
    """
    from peft import LoraConfig

    parsed = parse_lora_state_dict(state_dict, prefix=prefix, source=source)
    if parsed.unprocessed or not parsed.pairs:
        raise LoraFormatError(f"{source}: cannot build a LoRA config; unrecognised keys: {sorted(parsed.unprocessed)[:20]}")
    ranks = {p.rank for p in parsed.pairs.values()}
    if len(ranks) != 1:
        raise LoraFormatError(f"{source}: mixed LoRA ranks {sorted(ranks)} are not supported unmerged; merge instead")
    rank = ranks.pop()
    alpha = lora_alpha if lora_alpha is not None else rank
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(parsed.pairs),
        init_lora_weights=False,
    )


def to_peft_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = LORA_KEY_PREFIX) -> dict[str, torch.Tensor]:
    """Convert any supported LoRA key format to peft's ``<module>.lora_A.weight`` without prefix."""
    parsed = parse_lora_state_dict(state_dict, prefix=prefix)
    out = {}
    for name, pair in parsed.pairs.items():
        out[f"{name}.lora_A.weight"] = pair.down
        out[f"{name}.lora_B.weight"] = pair.up
    return out


def attach_lora(model: nn.Module, state_dict: dict[str, torch.Tensor], lora_alpha: float | None = None,
                prefix: str = LORA_KEY_PREFIX, adapter_name: str = "default", source: str = "LoRA state dict") -> None:
    """Attach an *unmerged* LoRA adapter to a diffusers model via peft and load its weights.

    Raises:
        LoraFormatError: as :func:`merge_lora_into` (checked before the adapter is added, so the
            model is left unchanged), or mixed ranks, or keys peft does not accept; names ``source``.
    """
    from peft import set_peft_model_state_dict

    config = lora_config_from_state_dict(state_dict, lora_alpha=lora_alpha, prefix=prefix, source=source)
    _check_lora_fits(model, parse_lora_state_dict(state_dict, prefix=prefix, source=source), source)
    model.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, to_peft_state_dict(state_dict, prefix), adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise LoraFormatError(f"{source}: peft did not accept LoRA keys: {unexpected[:20]}")
