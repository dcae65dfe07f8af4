"""Arguments and reporting shared by the ``osdface train`` programs (stage 1 ``vre``, stage 2 ``generator``).

Both :mod:`osdface.cli.train` and :mod:`osdface.cli.train_generator` import from here; neither
imports the other's privates, so there is no import cycle between them.
"""

from __future__ import annotations

import argparse


def add_common_args(p: argparse.ArgumentParser, example_config: str = "configs/vre-paper.yaml") -> None:
    """Add the flags every trainer takes: config, data, output, steps, resume, overrides, device.

    ``example_config`` is the experiment file the ``--config`` help names (the trainer's own paper recipe).
    """
    p.add_argument("--config", required=True, metavar="FILE", help=f"experiment YAML (e.g. {example_config})")
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


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``key.sub=value`` overrides of the command line: every ``--set`` item, then ``--max-steps``."""
    items = [x for group in args.overrides for x in group]
    if args.max_steps is not None:
        items.append(f"train.max_steps={args.max_steps}")
    return items


def print_result(result: dict) -> None:
    """What a finished training run reports: steps, checkpoint, skipped images, exported files."""
    print(f"trained {result['step']} steps; checkpoint {result['checkpoint']}")
    if result.get("undecodable_images"):
        print(f"skipped {result['undecodable_images']} undecodable training image(s) (named in the warnings)")
    for path in result["export"]:
        print(f"exported {path}")
