"""``osdface convert``: official release files → a self-contained, safe model folder."""

from __future__ import annotations

from pathlib import Path

from .common import report_error


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


def run(args) -> int:
    import shutil
    import tempfile

    from ..pipelines.pipeline_osdface import OSDFacePipeline
    from ..weights import WeightsNotFoundError

    out = Path(args.output).expanduser()
    if out.exists() and any(out.iterdir()):
        report_error(f"{out} exists and is not empty; choose a new folder")
        return 2
    try:
        pipe = OSDFacePipeline.from_official(args.base_model, args.weights, fuse_lora=args.fuse_lora)
    except (WeightsNotFoundError, ValueError) as e:
        report_error(str(e))
        return 2
    if args.dtype != "fp32":
        pipe.to(dtype=args.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, fuse_lora=args.fuse_lora)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"wrote {out}")
    return 0
