"""``osdface train``: training programs. ``osdface train vre`` runs one stage-1 phase,
``osdface train generator`` (:mod:`osdface.cli.train_generator`) stage 2.

Multi-GPU / multi-node: launch the same command through accelerate, e.g.
``accelerate launch --multi_gpu --num_processes 8 -m osdface train vre ...``.
"""

from __future__ import annotations

from .train_common import add_common_args, config_overrides, print_result
from .train_generator import add_parser as add_generator_parser  # stage 2 (its own module)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train OSDFace models (stage 1: vre, stage 2: generator)",
                       description="Training programs. Use 'accelerate launch -m osdface train ...' for "
                       "several GPUs or nodes.")
    tsub = p.add_subparsers(dest="trainer", metavar="TRAINER")
    vre = tsub.add_parser("vre", help="stage 1: HQ/LQ VQ-GANs + association → the VRE",
                          description="Run one stage-1 phase (phase: hq, lq or assoc in the config). "
                          "Writes RUN_DIR/checkpoints/step-*/, RUN_DIR/logs (TensorBoard), RUN_DIR/log.jsonl "
                          "and, for phases lq/assoc, RUN_DIR/export/{vre/,associate_2.ckpt}.")
    add_common_args(vre)
    vre.set_defaults(run=run_vre)
    add_generator_parser(tsub)
    p.set_defaults(run=lambda args: _missing_trainer(p))


def _missing_trainer(parser) -> int:
    parser.print_help()
    return 2


def run_vre(args) -> int:
    from ..training.vre import load_vre_config, train_vre
    from .common import check_output_dir

    check_output_dir("-o", args.output)
    cfg = load_vre_config(args.config, config_overrides(args))
    result = train_vre(cfg, args.data, args.output, val_data=args.val_data, resume=args.resume, cpu=args.cpu)
    print_result(result)
    return 0


__all__ = ["add_parser", "run_vre", "print_result"]
