"""``osdface degrade``: synthesise a CelebA-Test-style LQ set from a folder of HQ faces."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OutputPathError
from .common import CLIError, add_overwrite_arg, check_output_dir, check_output_files, report_error


def add_parser(sub) -> None:
    p = sub.add_parser(
        "degrade",
        help="write a synthetic low-quality copy of every HQ image in a folder",
        description="Degrade every image in HQ_DIR with lq = [(hq * k_sigma) down_r + n_delta]_JPEG_q up_r "
        "and write OUT_DIR/<stem>.png, the same size as its HQ image. Parameters are drawn per image "
        "from (--seed, file name), so results do not depend on order or --workers; they are recorded "
        "in a JSON manifest. Unreadable inputs are reported and skipped (exit code 1).",
    )
    p.add_argument("hq_dir", metavar="HQ_DIR", help="folder of HQ images (not recursive)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="degradation preset: daefr (default) or osediff-face")
    g.add_argument("--config", metavar="FILE.yaml", help="degradation config YAML (may start from 'preset: NAME')")
    p.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    p.add_argument("--manifest", metavar="FILE", help="JSON manifest of drawn parameters (default OUT_DIR/manifest.json, "
                   "replaced on a re-run); never an HQ or LQ image; an existing FILE needs --overwrite")
    p.add_argument("--scale", type=float, nargs="+", metavar="R", help="down-sampling factor r, or a range LO HI")
    p.add_argument("--sigma", type=float, nargs="+", metavar="S", help="blur sigma (pixels), or a range LO HI")
    p.add_argument("--noise", type=float, nargs="+", metavar="D", help="Gaussian noise sigma (0-255), or LO HI")
    p.add_argument("--jpeg", type=int, nargs="+", metavar="Q", help="JPEG quality, or a range LO HI")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    add_overwrite_arg(p, "the --manifest file")
    p.set_defaults(run=run)


_OVERRIDES = {"scale": "downsample_range", "sigma": "blur_sigma", "noise": "noise_range", "jpeg": "jpeg_range"}


def _build_config(args):
    from ..data.degradation import PRESETS, DegradationConfig, load_degradation_config

    if args.config:
        config = load_degradation_config(args.config)
    else:
        name = args.preset or "daefr"
        if name not in PRESETS:
            raise CLIError(f"unknown degradation preset {name!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[name]
    overrides = {}
    for flag, key in _OVERRIDES.items():
        values = getattr(args, flag)
        if values is None:
            continue
        if len(values) > 2:
            raise CLIError(f"--{flag} takes one value or a range LO HI, got {len(values)} values")
        overrides[key] = (values[0], values[-1])
    return DegradationConfig.from_dict(overrides, base=config) if overrides else config


def run(args) -> int:
    from ..data.files import list_images
    from ..data.testset import degrade_folder, lq_name

    if args.workers < 1:
        raise CLIError("--workers must be >= 1")
    if args.seed < 0:
        raise CLIError("--seed must be non-negative")
    hq_dir = Path(args.hq_dir).expanduser()
    if not hq_dir.is_dir():
        raise CLIError(f"{hq_dir}: no such folder")
    out_dir = check_output_dir("-o", args.output)
    if out_dir.exists() and out_dir.resolve() == hq_dir.resolve():
        raise OutputPathError(f"{out_dir}: the output folder is the input folder; choose another one")
    config = _build_config(args)  # an invalid file or range: ConfigError (an OSDFaceError, one line in main)
    # every path this run writes, checked before any work: the manifest is never an HQ or LQ image;
    # the default one inside OUT_DIR is osdface's own and replaced on a re-run
    names = list_images(hq_dir, recursive=False)
    manifest, = check_output_files(
        [("--manifest", args.manifest or out_dir / "manifest.json")], inputs=[hq_dir / n for n in names],
        planned=[out_dir / lq_name(n) for n in names], out_dirs=[out_dir],
        overwrite=args.overwrite or not args.manifest)
    result = degrade_folder(hq_dir, out_dir, config, seed=args.seed, workers=args.workers,
                            manifest_path=manifest, progress=True, on_error=report_error)
    n_ok = len(result.records)
    n_bad = len(result.errors)
    print(f"wrote {n_ok} LQ image(s) into {out_dir}, manifest {manifest}"
          + (f"; {n_bad} failed" if n_bad else ""), file=sys.stderr)
    return 1 if n_bad else 0
