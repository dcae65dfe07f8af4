"""The ``osdface`` command: a thin argparse layer over the Python API.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``;
modules are imported only when listed here and their heavy dependencies only inside ``run``, so
``osdface --version`` returns at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .._version import __version__
from ..errors import OSDFaceError

#: subcommand name → module (explicit: no scanning).
SUBCOMMANDS = {
    "restore": "osdface.cli.restore",
    "convert": "osdface.cli.convert",
    "env": "osdface.cli.env",
    "train": "osdface.cli.train",
    "degrade": "osdface.cli.degrade",
    "align": "osdface.cli.align",
    "export": "osdface.cli.export",
    "export-onnx": "osdface.cli.export_onnx",
    "export-openvino": "osdface.cli.export_openvino",
    "evaluate": "osdface.cli.evaluate",  # also registers `benchmark-table`
    "weights": "osdface.cli.weights",
    "serve": "osdface.cli.serve",
    "demo": "osdface.cli.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osdface", description="OSDFace one-step diffusion face restoration."
    )
    parser.add_argument("--version", action="version", version=f"osdface {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 some inputs failed, 2 usage/setup error).

    Subcommands raise :class:`~osdface.errors.OSDFaceError` for anything the user can fix (a bad
    option, a missing or malformed file); it is reported here as one line, without a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except OSDFaceError as e:  # the one funnel: any error a user can cause → one message, exit 2
        print(f"osdface: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
