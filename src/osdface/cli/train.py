"""``osdface train``: training programs. ``osdface train vre`` runs one stage-1 phase.

Multi-GPU / multi-node: launch the same command through accelerate, e.g.
``accelerate launch --multi_gpu --num_processes 8 -m osdface train vre ...``.
"""

from __future__ import annotations


def _add_common(p) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="experiment YAML (e.g. configs/vre-paper.yaml)")
    p.add_argument("--data", required=True, nargs="+", metavar="HQ_DIR", help="folder(s) of aligned HQ faces")
    p.add_argument("--val-data", nargs="+", metavar="DIR", help="validation face folder(s) "
                   "(default: the first data.val_images training faces)")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run folder (checkpoints, logs, export)")
    p.add_argument("--max-steps", type=int, metavar="N", help="shortcut for --set train.max_steps=N")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in RUN_DIR "
                   "(a corrupt or incomplete newer one is skipped, with a warning saying why)")
    p.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE",
                   help="override config values, e.g. --set loss.lpips=0.5 optim.lr=1e-5 (repeatable)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train OSDFace models (stage 1: vre)",
                       description="Training programs. Use 'accelerate launch -m osdface train ...' for "
                       "several GPUs or nodes.")
    tsub = p.add_subparsers(dest="trainer", metavar="TRAINER")
    vre = tsub.add_parser("vre", help="stage 1: HQ/LQ VQ-GANs + association → the VRE",
                          description="Run one stage-1 phase (phase: hq, lq or assoc in the config). "
                          "Writes RUN_DIR/checkpoints/step-*/, RUN_DIR/logs (TensorBoard), RUN_DIR/log.jsonl "
                          "and, for phases lq/assoc, RUN_DIR/export/{vre/,associate_2.ckpt}.")
    _add_common(vre)
    vre.set_defaults(run=run_vre)
    from .train_generator import add_parser as add_generator_parser  # stage 2 (its own module)

    add_generator_parser(tsub, _add_common)
    p.set_defaults(run=lambda args: _missing_trainer(p))


def _missing_trainer(parser) -> int:
    parser.print_help()
    return 2


def _overrides(args) -> list[str]:
    items = [x for group in args.overrides for x in group]
    if args.max_steps is not None:
        items.append(f"train.max_steps={args.max_steps}")
    return items


def run_vre(args) -> int:
    from ..training.vre import load_vre_config, train_vre
    from .common import check_output_dir

    check_output_dir("-o", args.output)
    cfg = load_vre_config(args.config, _overrides(args))
    result = train_vre(cfg, args.data, args.output, val_data=args.val_data, resume=args.resume, cpu=args.cpu)
    print_result(result)
    return 0


def print_result(result: dict) -> None:
    """What a finished training run reports: steps, checkpoint, skipped images, exported files."""
    print(f"trained {result['step']} steps; checkpoint {result['checkpoint']}")
    if result.get("undecodable_images"):
        print(f"skipped {result['undecodable_images']} undecodable training image(s) (named in the warnings)")
    for path in result["export"]:
        print(f"exported {path}")
