"""Training checkpoints: safetensors + JSON components, plus accelerate state for resume only.

Layout of ``RUN/checkpoints/step-0000500/``::

    <component>/            config.json + diffusion_pytorch_model.safetensors (``save_pretrained``)
    extra.safetensors       loose tensors (e.g. the association logit scale)
    trainer_state.json      step, epoch, micro-batches consumed in that epoch, processes, seed
    config.yaml             the resolved experiment config
    accelerate_state/       optimisers, RNG, scaler (``Accelerator.save_state``; internal, resume only)

A checkpoint is written into ``.tmp-step-…`` and renamed when complete, so a crash never leaves
a half-written ``step-…`` folder; :func:`latest_checkpoint` ignores temporary folders.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.io import write_text_atomic
from ..utils.logging import get_logger

logger = get_logger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or ``None``."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (→ its latest checkpoint)."""
    p = Path(path).expanduser()
    if (p / TRAINER_STATE).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"{p} is neither a checkpoint folder (no {TRAINER_STATE}) nor a run folder "
                                "with checkpoints/step-*")
    return latest


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / TRAINER_STATE).read_text())


def save_checkpoint(accelerator, run_dir: str | Path, step: int, modules: dict[str, nn.Module],
                    extra: dict[str, torch.Tensor], state: dict[str, Any], config_yaml: str) -> Path:
    """Write a checkpoint atomically; call on **every** process (accelerate saves per-rank RNG state)."""
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate_state"))
    if accelerator.is_main_process:
        for name, module in modules.items():
            module.save_pretrained(tmp / name, safe_serialization=True)
        if extra:
            save_file({k: v.detach().float().cpu().contiguous().reshape(v.shape) for k, v in extra.items()},
                      str(tmp / "extra.safetensors"))
        write_text_atomic(tmp / "config.yaml", config_yaml)
        write_text_atomic(tmp / TRAINER_STATE, json.dumps(state, indent=2))
        if final.exists():  # the same step written again (e.g. a resumed run that stopped there)
            shutil.rmtree(final)
        tmp.rename(final)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints."""
    ckpts = list_checkpoints(run_dir)
    for old in ckpts[: max(0, len(ckpts) - keep_last)]:
        shutil.rmtree(old)


def load_extra_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = Path(ckpt) / "extra.safetensors"
    return load_file(str(f)) if f.is_file() else {}
