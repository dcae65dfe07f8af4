"""``osdface train generator``: stage 2, the one-step generator (docs/method.md §6).

Registered under ``osdface train`` by :func:`add_parser` (called from :mod:`osdface.cli.train`; the shared
flags and reporting are in :mod:`osdface.cli.train_common`).
Several GPUs / nodes: ``accelerate launch --multi_gpu --num_processes 8 -m osdface train generator ...``.
"""

from __future__ import annotations

from pathlib import Path

from .common import CLIError
from .train_common import add_common_args, config_overrides, print_result


def add_parser(tsub) -> None:
    """Add ``generator`` to the ``osdface train`` subparsers ``tsub``."""
    p = tsub.add_parser(
        "generator", help="stage 2: the one-step generator (UNet LoRA + prompt adapter, GAN guidance)",
        description="Train the OSDFace generator: LoRA on the SD 2.1-base UNet + the prompt adapter, with MSE, "
        "EA-DISTS, identity and latent-GAN losses. Start from scratch with a frozen VRE (--vre: a stage-1 export "
        "or the official associate_2.ckpt) or fine-tune the official release (--weights). Writes "
        "RUN_DIR/checkpoints/step-*/, RUN_DIR/logs (TensorBoard), RUN_DIR/log.jsonl and RUN_DIR/export/ (the three "
        "official-layout files); 'osdface export RUN_DIR -o MODEL_DIR' makes a model folder.")
    add_common_args(p, example_config="configs/generator-paper.yaml")
    p.add_argument("--base-model", metavar="SD_DIR",
                   help="Stable Diffusion 2.1-base diffusers folder (scheduler/, unet/, vae/); sets model.base_model")
    p.add_argument("--vre", metavar="PATH", help="frozen VRE: a VisualPromptEncoder folder (stage-1 RUN/export/vre) "
                   "or an associate_2.ckpt-layout file; sets model.vre")
    p.add_argument("--weights", metavar="OSDFACE_DIR", help="fine-tune the official release in this folder "
                   "(VRE + adapter + LoRA); sets model.weights")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..training.generator_config import load_generator_config
    from ..training.generator_task import train_generator
    from .common import check_output_dir

    check_output_dir("-o", args.output)
    items = config_overrides(args)
    for flag, key in (("base_model", "model.base_model"), ("vre", "model.vre"), ("weights", "model.weights")):
        value = getattr(args, flag)
        if value is not None:  # absolute: the run records it (resume, export from anywhere)
            items.append(f"{key}={_yaml_str(Path(value).expanduser().resolve())}")
    cfg = load_generator_config(args.config, items)
    if not cfg.model.base_model:
        raise CLIError("give --base-model SD_DIR (or model.base_model in the config)")
    if not cfg.model.vre and not cfg.model.weights:
        raise CLIError("give --vre PATH (train from scratch with a frozen VRE) or --weights OSDFACE_DIR (fine-tune)")
    result = train_generator(cfg, args.data, args.output, val_data=args.val_data, resume=args.resume, cpu=args.cpu)
    print_result(result)
    return 0


def _yaml_str(value: str) -> str:
    """Quote a path so the override parser (YAML) keeps it a string."""
    import json

    return json.dumps(str(value))
