"""``osdface convert``: official release files → a self-contained, safe model folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import OutputPathError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert the official OSDFace release into a safetensors model folder",
        description="Load SD 2.1-base + the official OSDFace files (no code from the checkpoints is run) "
        "and write a model folder (safetensors + JSON) for 'osdface restore --model'.",
    )
    p.add_argument("--base-model", required=True, metavar="SD_DIR", help="Stable Diffusion 2.1-base diffusers folder")
    p.add_argument("--weights", required=True, metavar="OSDFACE_DIR", help="folder with the official OSDFace files")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="where to write the model folder")
    p.add_argument("--fuse-lora", dest="fuse_lora", action="store_true", default=True,
                   help="merge the LoRA into the UNet weights (default)")
    p.add_argument("--no-fuse-lora", dest="fuse_lora", action="store_false",
                   help="keep the base UNet and write the LoRA as unet_lora/")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="stored precision (default fp32)")
    p.set_defaults(run=run)


def check_new_model_dir(output: str) -> Path:
    """``-o MODEL_DIR`` must be a new or empty folder (nothing is ever overwritten); returns it expanded.

    Raises:
        OutputPathError: it exists and is not an empty folder, or a parent is a file.
    """
    from .common import check_output_dir

    out = check_output_dir("-o", output)
    if out.is_dir() and any(out.iterdir()):
        raise OutputPathError(f"{out} exists and is not empty; choose a new folder")
    return out


def write_model_dir(out: Path, write) -> None:
    """Run ``write(folder)`` into a temporary folder beside ``out`` and rename it onto ``out`` when done.

    Temporaries of killed runs in ``out``'s parent are removed first; on any error (or a kill) no
    partial ``out`` is left, and the finished folder gets normal permissions (safetensors writes 0600).
    """
    from ..utils.io import atomic_dir, clean_stale_temps

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent)
    with atomic_dir(out) as tmp:
        write(tmp)


def run(args) -> int:
    from ..pipelines.pipeline_osdface import OSDFacePipeline

    out = check_new_model_dir(args.output)
    pipe = OSDFacePipeline.from_official(args.base_model, args.weights, fuse_lora=args.fuse_lora)
    if args.dtype != "fp32":
        pipe.to(dtype=args.dtype)
    write_model_dir(out, lambda tmp: pipe.save_pretrained(tmp, fuse_lora=args.fuse_lora))
    print(f"wrote {out}")
    return 0
