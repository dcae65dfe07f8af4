"""Helpers shared by CLI subcommands: input expansion, model loading flags, error reporting."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS
from ..errors import OSDFaceError


class CLIError(OSDFaceError):
    """A usage or set-up problem: printed without a traceback, exit code 2."""


def expand_inputs(inputs: list[str], extensions=IMAGE_EXTENSIONS) -> tuple[list[Path], list[str]]:
    """Files, folders (non-recursive, sorted) and globs → (existing files, problems)."""
    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in extensions)
            if not found:
                problems.append(f"{p}: folder contains no images ({', '.join(extensions)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif any(ch in item for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True) if Path(m).is_file())
            if not matched:
                problems.append(f"{item}: pattern matches no files")
            files.extend(matched)
        else:
            problems.append(f"{p}: no such file or folder")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (default: $OSDFACE_HOME/model, else $OSDFACE_HOME/{stable-diffusion-2-1-base,OSDFace})")
    g.add_argument("--model", metavar="MODEL_DIR", help="a converted osdface model folder")
    g.add_argument("--base-model", metavar="SD_DIR", help="Stable Diffusion 2.1-base diffusers folder")
    g.add_argument("--weights", metavar="OSDFACE_DIR", help="folder with the official OSDFace release files")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="run precision (default: fp16 on CUDA, fp32 elsewhere)")
    g.add_argument("--no-fuse-lora", dest="fuse_lora", action="store_false",
                   help="keep the LoRA unmerged (peft) instead of merging it into the UNet")


def load_pipeline_from_args(args):
    """Build the pipeline from --model / --base-model+--weights / the default locations."""
    from ..pipelines.pipeline_osdface import OSDFacePipeline, resolve_device
    from ..weights import (
        OFFICIAL_FILES,
        OFFICIAL_WEIGHTS_HELP,
        WeightsNotFoundError,
        default_base_model_dir,
        default_model_dir,
        default_official_dir,
        osdface_home,
    )

    device = resolve_device(args.device)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "fp16" if device.type == "cuda" else "fp32"
    if args.model and (args.base_model or args.weights):
        raise CLIError("give either --model or --base-model/--weights, not both")
    if bool(args.base_model) != bool(args.weights):
        raise CLIError("--base-model and --weights go together (the SD 2.1-base folder and the OSDFace files)")
    try:
        if args.model:
            return OSDFacePipeline.from_pretrained(args.model, torch_dtype=dtype, device=device, fuse_lora=args.fuse_lora)
        if args.base_model:
            return OSDFacePipeline.from_official(args.base_model, args.weights, torch_dtype=dtype, device=device,
                                                 fuse_lora=args.fuse_lora)
        if (default_model_dir() / "model_index.json").is_file():
            return OSDFacePipeline.from_pretrained(default_model_dir(), torch_dtype=dtype, device=device,
                                                   fuse_lora=args.fuse_lora)
        return OSDFacePipeline.from_official(default_base_model_dir(), default_official_dir(), torch_dtype=dtype,
                                             device=device, fuse_lora=args.fuse_lora)
    except WeightsNotFoundError as e:
        if args.model or args.base_model:
            raise CLIError(str(e)) from None
        home = osdface_home()
        raise CLIError(
            "No OSDFace weights found. Either\n"
            f"  (a) put the official files in {default_official_dir()}/ ({', '.join(OFFICIAL_FILES)})\n"
            f"      and the diffusers SD 2.1-base folder in {default_base_model_dir()}/ (scheduler/, unet/, vae/),\n"
            f"  (b) or pass --base-model SD_DIR --weights OSDFACE_DIR, or --model MODEL_DIR.\n"
            f"Set OSDFACE_HOME to use another folder than {home}.\n"
            f"{OFFICIAL_WEIGHTS_HELP}"
        ) from e


def report_error(message: str) -> None:
    print(f"osdface: error: {message}", file=sys.stderr)
