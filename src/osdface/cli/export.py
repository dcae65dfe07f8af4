"""``osdface export``: a stage-2 training run → a model folder (and/or the official release layout)."""

from __future__ import annotations

from pathlib import Path

from .common import CLIError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="turn a generator training run into a model folder for 'osdface restore --model'",
        description="Export the latest intact checkpoint of a stage-2 run (or the given checkpoint folder): a "
        "self-contained model folder (safetensors + JSON; the SD 2.1-base VAE/UNet come from the run's base model) "
        "and, with --official-layout, the three files of the official release (associate_2.ckpt, "
        "embedding_change_weights.pth, pytorch_lora_weights.safetensors) for the official inference code.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="stage-2 run folder or one of its checkpoints/step-* folders")
    p.add_argument("-o", "--output", metavar="MODEL_DIR", help="model folder to write (must not exist or be empty)")
    p.add_argument("--official-layout", metavar="DIR", help="also write the three official release files here "
                   "(refused where they already exist)")
    p.add_argument("--base-model", metavar="SD_DIR", help="SD 2.1-base folder (default: the one the run used)")
    p.add_argument("--no-fuse-lora", dest="fuse_lora", action="store_false",
                   help="keep the LoRA as unet_lora/ instead of merging it into the UNet weights")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="stored precision (default fp32)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..training.generator import export_generator
    from .common import check_output_dir
    from .convert import check_new_model_dir, write_model_dir

    if not args.output and not args.official_layout:
        raise CLIError("nothing to do: give -o MODEL_DIR and/or --official-layout DIR")
    out = check_new_model_dir(args.output) if args.output else None
    official = check_output_dir("--official-layout", args.official_layout) if args.official_layout else None
    result: dict = {}

    def export(model_dir: Path | None) -> None:
        result.update(export_generator(args.run_dir, model_dir, base_model=args.base_model, fuse_lora=args.fuse_lora,
                                       official_dir=official, dtype=args.dtype))

    if out is not None:
        write_model_dir(out, export)
    else:
        export(None)
    print(f"exported {result['checkpoint']}")
    if out is not None:
        print(f"wrote {out}")
    for path in result["official"] or []:
        print(f"wrote {path}")
    return 0
