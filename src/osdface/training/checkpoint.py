"""Training checkpoints: safetensors + JSON components, plus accelerate state for resume only.

Layout of ``RUN/checkpoints/step-0000500/``::

    <component>/            config.json + diffusion_pytorch_model.safetensors (``save_pretrained``)
    extra.safetensors       loose tensors (e.g. the association logit scale)
    config.yaml             the resolved experiment config
    accelerate_state/       optimisers, RNG, scaler (``Accelerator.save_state``; internal, resume only)
    manifest.json           size and SHA-256 of every file above
    trainer_state.json      step, epoch, micro-batches consumed in that epoch, processes, seed

A checkpoint is written into ``.tmp-step-…`` and renamed when complete, so a crash never leaves
a half-written ``step-…`` folder; ``trainer_state.json`` is written last.

Reading one is defensive (issue 12: a corrupt checkpoint is never a traceback):

* :func:`validate_checkpoint` checks that the files are all there and intact (the manifest), that
  ``trainer_state.json`` parses and holds a plausible step (an integer that matches the folder name
  and does not exceed the ``train.max_steps`` the checkpoint was written under);
* :func:`latest_checkpoint` returns the newest checkpoint that passes, logging which newer ones it
  skipped and why (resume and export of a run fall back to the previous complete checkpoint);
* :func:`resolve_checkpoint` on an explicitly named checkpoint folder refuses a bad one, naming the file;
* :func:`restore_accelerate_state` turns what torch/accelerate raise on a tampered state file into
  :class:`~osdface.errors.ModelFileError` naming that file.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..errors import ModelFileError, OSDFaceError, WeightsNotFoundError
from ..io.names import CONFIG_NAME
from ..io.names import WEIGHTS_NAME as _WEIGHTS_NAME
from ..model_limits import read_config
from ..utils.io import normalize_permissions, read_json, sha256_file, write_text_atomic
from ..utils.logging import get_logger

logger = get_logger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
CONFIG_YAML = "config.yaml"
ACCELERATE_STATE = "accelerate_state"
#: a step above this is not a real run (the bound of ``train.max_steps`` in the config table)
MAX_STEP = 10**9
#: epoch / micro-batch counters above this are not a real run either (they seed the data order)
_MAX_COUNTER = 10**12
#: what torch / accelerate / safetensors raise for a tampered or truncated state file
_STATE_ERRORS = (pickle.UnpicklingError, EOFError, OSError, RuntimeError, KeyError, ValueError, TypeError,
                 IndexError)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def _step_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Every ``checkpoints/step-*`` folder of a run, complete or not, oldest first."""
    return [p for _, p in _step_folders(run_dir)]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run that were finished (``trainer_state.json`` written), oldest first.

    Finished is not the same as intact: :func:`latest_checkpoint` also validates.
    """
    return [p for _, p in _step_folders(run_dir) if (p / TRAINER_STATE).is_file()]


def _reason(e: BaseException) -> str:
    """One line saying why a file could not be read (torch's messages run over several lines, and
    its first line for a refused pickle suggests ``weights_only=False``, which we never do)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, pickle.UnpicklingError):
        refused = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
        return (f"refused: {refused[0]}" if refused else
                "not a pickle of plain tensors (refused: it could run code)")
    if isinstance(e, KeyError):
        return f"malformed pickle (dangling reference {e})"
    if isinstance(e, EOFError):
        return "the file ends early (truncated or empty)"
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _counter(state: Mapping[str, Any], field: str, source: Path, lo: int, hi: int, required: bool = True) -> int | None:
    value = state.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        shown = "missing" if field not in state else f"{value!r:.40}"
        raise ModelFileError(f"{source}: field '{field}' must be an integer, got {shown}")
    if not lo <= value <= hi:
        raise ModelFileError(f"{source}: field '{field}' = {value} is implausible (expected {lo}..{hi})")
    return value


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, checked field by field.

    Raises:
        ModelFileError: the file is missing, malformed, not an object, or a field is not a plausible
            integer (step 1..10⁹ and equal to the ``step-N`` folder name; counters ≥ 0); the
            message names the file and the field.
    """
    ckpt = Path(ckpt)
    source = ckpt / TRAINER_STATE
    state = read_config(source, "trainer state")
    step = _counter(state, "step", source, 1, MAX_STEP)
    m = _STEP_DIR.match(ckpt.name)
    if m and int(m.group(1)) != step:
        raise ModelFileError(f"{source}: field 'step' = {step} does not match the folder name {ckpt.name}")
    _counter(state, "epoch", source, 0, _MAX_COUNTER)
    _counter(state, "batch_in_epoch", source, 0, _MAX_COUNTER)
    for field, lo, hi in (("num_processes", 1, 1 << 20), ("batch_size", 1, 1 << 20), ("grad_accum", 1, 1 << 20),
                          ("seed", 0, 2**63 - 1)):
        _counter(state, field, source, lo, hi, required=False)
    return state


def _manifest_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in (MANIFEST, TRAINER_STATE))


def write_manifest(ckpt: str | Path) -> None:
    """Record size and SHA-256 of every file of the (not yet finished) checkpoint folder ``ckpt``."""
    ckpt = Path(ckpt)
    files = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _manifest_files(ckpt)}
    write_text_atomic(ckpt / MANIFEST, json.dumps({"files": files}, indent=1))


def _check_manifest(ckpt: Path) -> None:
    source = ckpt / MANIFEST
    manifest = read_json(source, what="checkpoint manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ModelFileError(f"{source}: malformed checkpoint manifest (no 'files' object)")
    for rel, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) \
                or not isinstance(entry.get("sha256"), str):
            raise ModelFileError(f"{source}: malformed entry for {rel!r}")
        path = ckpt / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ModelFileError(f"{source}: entry {rel!r} points outside the checkpoint")
        if not path.is_file():
            raise ModelFileError(f"{path}: missing (the checkpoint is incomplete)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ModelFileError(f"{path}: {size} bytes, the checkpoint recorded {entry['size']} "
                                 "(truncated or modified)")
        if sha256_file(path) != entry["sha256"]:
            raise ModelFileError(f"{path}: contents differ from the checksum recorded in {MANIFEST} "
                                 "(corrupted or modified)")


def _recorded_max_steps(ckpt: Path) -> int:
    source = ckpt / CONFIG_YAML
    try:
        cfg = yaml.safe_load(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{source}: missing (the checkpoint is incomplete)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelFileError(f"{source}: cannot read the checkpoint's config ({_reason(e)})") from None
    train = cfg.get("train") if isinstance(cfg, dict) else None
    value = train.get("max_steps") if isinstance(train, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_STEP:
        raise ModelFileError(f"{source}: no plausible train.max_steps (got {value!r:.40})")
    return value


def validate_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """Check that ``ckpt`` is a complete, intact, plausible checkpoint; return its trainer state.

    Checks: the folder, ``trainer_state.json`` (see :func:`read_trainer_state`), ``config.yaml``
    (its ``train.max_steps`` bounds the step), ``accelerate_state/``, and every file against the
    sizes and SHA-256 sums of ``manifest.json`` (checkpoints written before the manifest existed
    get the structural checks only).

    Raises:
        ModelFileError: naming the file and the problem.
        WeightsNotFoundError: ``ckpt`` is not a folder.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise WeightsNotFoundError(f"{ckpt}: no such checkpoint folder")
    if not (ckpt / TRAINER_STATE).is_file():
        raise ModelFileError(f"{ckpt}: incomplete checkpoint (no {TRAINER_STATE}; an interrupted save?)")
    state = read_trainer_state(ckpt)
    max_steps = _recorded_max_steps(ckpt)
    if state["step"] > max_steps:
        raise ModelFileError(f"{ckpt / TRAINER_STATE}: field 'step' = {state['step']} is beyond the run's "
                             f"train.max_steps = {max_steps} ({ckpt / CONFIG_YAML})")
    acc_dir = ckpt / ACCELERATE_STATE
    if not acc_dir.is_dir() or not any(acc_dir.iterdir()):
        raise ModelFileError(f"{acc_dir}: missing or empty (the checkpoint is incomplete)")
    if (ckpt / MANIFEST).exists():
        _check_manifest(ckpt)
    return state


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of ``run_dir`` (``None`` when the run has no checkpoint folder).

    Newer ``step-*`` folders that fail :func:`validate_checkpoint` are skipped with a warning
    naming the problem, so a run falls back to its previous complete checkpoint.

    Raises:
        ModelFileError: there are checkpoint folders but none is usable (the newest one's problem).
    """
    folders = checkpoint_folders(run_dir)
    first_error: ModelFileError | None = None
    for ckpt in reversed(folders):
        try:
            validate_checkpoint(ckpt)
        except ModelFileError as e:
            logger.warning("skipping checkpoint %s: %s", ckpt.name, e)
            first_error = first_error or e
            continue
        if first_error is not None:
            logger.warning("falling back to %s, the newest intact checkpoint of %s", ckpt.name, run_dir)
        return ckpt
    if first_error is not None:
        raise ModelFileError(f"{Path(run_dir) / 'checkpoints'}: no usable checkpoint; the newest: {first_error}")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (validated; a bad one is an error), or a run folder (→ its newest intact checkpoint).

    Raises:
        ModelFileError: the named checkpoint is incomplete, corrupt or implausible (naming the file),
            or no checkpoint of the run is usable.
        WeightsNotFoundError: ``path`` is neither a checkpoint nor a run folder with checkpoints.
    """
    p = Path(path).expanduser()
    if (p / TRAINER_STATE).exists() or (_STEP_DIR.match(p.name) and p.parent.name == "checkpoints" and p.is_dir()):
        validate_checkpoint(p)
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise WeightsNotFoundError(f"{p} is neither a checkpoint folder (no {TRAINER_STATE}) nor a run folder "
                                   "with checkpoints/step-*")
    return latest


def restore_accelerate_state(accelerator, ckpt: str | Path) -> None:
    """``accelerator.load_state(ckpt/accelerate_state)``; a file it cannot read is a :class:`ModelFileError`.

    On failure every state file is read again on its own (the way accelerate reads it) to name
    the culprit; the message says how to fall back to the previous checkpoint.
    """
    from safetensors import SafetensorError

    ckpt = Path(ckpt)
    state_dir = ckpt / ACCELERATE_STATE
    hint = f"; delete {ckpt} to resume from the previous checkpoint"
    from accelerate.utils.other import load

    # accelerate catches an unreadable RNG file and only logs it: the resume would silently stop being exact
    rng_file = state_dir / f"random_states_{accelerator.process_index}.pkl"
    try:
        if rng_file.exists():
            load(rng_file, map_location="cpu")
    except _STATE_ERRORS as e:
        raise ModelFileError(f"{rng_file}: cannot read the random-number state ({_reason(e)}){hint}") from e
    try:
        accelerator.load_state(str(state_dir))
    except OSDFaceError:
        raise
    except (SafetensorError, *_STATE_ERRORS) as e:
        culprit = _unreadable_state_file(state_dir)
        if culprit is not None:
            bad, why = culprit
            raise ModelFileError(f"{bad}: cannot read the training state ({why}){hint}") from e
        raise ModelFileError(f"{state_dir}: cannot restore the training state ({_reason(e)}); was it written "
                             f"with another config or model?{hint}") from e


def _unreadable_state_file(state_dir: Path) -> tuple[Path, str] | None:
    """The first file of an accelerate state folder that does not load alone, with the reason."""
    from accelerate.utils.other import load
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for f in sorted(state_dir.iterdir()):
        try:
            if f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix in (".bin", ".pkl", ".pt", ".pth"):
                load(f, map_location="cpu")
        except (SafetensorError, *_STATE_ERRORS) as e:
            return f, _reason(e)
    return None


def remove_unfinished_saves(run_dir: str | Path) -> list[Path]:
    """Remove the ``checkpoints/.tmp-step-*`` folders of saves that were killed; return them.

    Call on the main process before a run writes checkpoints (no save is in progress then; two
    runs training into one run folder at once are not supported).
    """
    root = Path(run_dir) / "checkpoints"
    removed = sorted(p for p in root.glob(".tmp-step-*") if p.is_dir()) if root.is_dir() else []
    for p in removed:
        shutil.rmtree(p)
        logger.info("removed %s, an unfinished checkpoint of an interrupted run", p)
    return removed


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
    accelerator.save_state(str(tmp / ACCELERATE_STATE))
    accelerator.wait_for_everyone()  # every rank's RNG file is in place before the manifest
    if accelerator.is_main_process:
        for name, module in modules.items():
            module.save_pretrained(tmp / name, safe_serialization=True)
        if extra:
            save_file({k: v.detach().float().cpu().contiguous().reshape(v.shape) for k, v in extra.items()},
                      str(tmp / "extra.safetensors"))
        write_text_atomic(tmp / CONFIG_YAML, config_yaml)
        normalize_permissions(tmp)
        write_manifest(tmp)
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


WEIGHTS_NAME = _WEIGHTS_NAME  # re-exported: the old home of the name (file names live in osdface.io.names)


def load_module_folder(klass, folder: str | Path, what: str,
                       check: Callable[[dict[str, Any], Path], None] | None = None,
                       config_name: str = CONFIG_NAME, weights: bool = True):
    """``klass.from_pretrained(folder)`` for a folder of a user (a checkpoint component, a base model
    part), checked before anything is allocated: :func:`osdface.io.model_folders.load_module_folder`.

    The config is parsed and passed to ``check`` (bounds, e.g. from :mod:`osdface.model_limits`);
    with ``weights``, the safetensors header must parse and the module the config declares (built
    on the ``meta`` device) must fit in the file (parameters × 2 bytes), so a config that asks for
    a huge network is refused instead of reaching the allocator. Only safetensors are read.

    Raises:
        WeightsNotFoundError: the folder, its config or its weights file is missing.
        ModelFileError: naming the file: malformed config, out of bounds, too large for its weights,
            not valid safetensors, or diffusers cannot load it.
    """
    from ..io.model_folders import load_module_folder as _load

    return _load(klass, folder, what, check=check, config_name=config_name, weights=weights)


def load_extra_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """``extra.safetensors`` of a checkpoint (``{}`` without one); a bad file is a :class:`ModelFileError`."""
    from ..safe_load import load_safetensors

    f = Path(ckpt) / "extra.safetensors"
    return load_safetensors(f, what="checkpoint extra tensors") if f.is_file() else {}
