"""``osdface evaluate`` (one result folder) and ``osdface benchmark-table`` (several methods).

Both subcommands are registered by this module's :func:`add_parser`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OSDFaceError
from .common import CLIError, add_overwrite_arg, check_name_part, check_output_files, report_error

DEFAULT_METRICS = "psnr,ssim,lpips,dists,niqe"


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="compute the paper's metrics for a folder of restored images")
    p.add_argument("--pred", help="folder of restored images")
    p.add_argument("--gt", help="folder of ground-truth images (matched by file stem)")
    p.add_argument("--metrics", default=DEFAULT_METRICS, help=f"comma-separated (default: {DEFAULT_METRICS})")
    p.add_argument("--out", default="report.json",
                   help="report JSON (default report.json); .md and .csv are written beside it. Never an input "
                        "image; existing files need --overwrite; missing folders are created")
    p.add_argument("--list-metrics", action="store_true", help="print the metric registry and exit")
    _common(p)
    p.add_argument("--compare", metavar="FILE", help="contact sheet LQ | restored | GT: FILE.html or FILE.png")
    p.add_argument("--lq", help="folder of degraded inputs for --compare")
    add_overwrite_arg(p, "the report files (--out and its .md/.csv) and the --compare sheet")
    p.set_defaults(run=run)

    b = sub.add_parser("benchmark-table", help="evaluate several methods' result folders; print Table 1/2-style tables")
    b.add_argument("results", nargs="+", metavar="RESULTS_DIR", help="one folder per method (name = folder name, "
                   "or NAME=DIR)")
    b.add_argument("--gt", help="ground-truth folder (Table 1, synthetic test sets)")
    b.add_argument("--table", choices=["1", "2"], default="1",
                   help="1: CelebA-Test layout (LPIPS DISTS MUSIQ NIQE Deg LMD FID); 2: real-world layout")
    b.add_argument("--metrics", default=None, help="default: table 1 lpips,dists,niqe,fid; table 2 niqe,fid")
    b.add_argument("--out", help="also write the Markdown table here, and one report JSON per method beside it "
                   "(OUT_STEM_<method>.json with .md/.csv); existing files need --overwrite")
    add_overwrite_arg(b, "the --out table and the per-method reports")
    _common(b)
    b.set_defaults(run=run_table)


def _common(p) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--weights-dir", help="metric weights folder (default: $OSDFACE_HOME/metrics)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fid-stats", help="reference FID statistics (.npz mu/sigma or BasicSR inception_*.pth)")
    p.add_argument("--no-fid-cache", action="store_true", help="do not read/write cached FID features")
    p.add_argument("--no-progress", action="store_true")


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _parse_metrics(text: str) -> list[str]:
    from ..evaluation.metrics import metric_info

    names = [m.strip() for m in text.split(",") if m.strip()]
    for n in names:
        try:
            metric_info(n)
        except KeyError as e:  # the message lists the valid names
            raise CLIError(e.args[0] if e.args else str(e)) from None
    return names


def _images(option: str, folder: str) -> list[Path]:
    """The images an evaluation reads from ``folder`` (named by ``option``); a missing folder is a usage error."""
    from ..evaluation.folder import list_images

    if not Path(folder).is_dir():
        raise CLIError(f"{folder}: no such folder ({option})")
    return list_images(folder)


def _report_outputs(label: str, out: str | Path) -> list[tuple[str, Path]]:
    """``(label, path)`` of the JSON report ``out`` and the .md/.csv files written beside it."""
    from ..evaluation.report import report_paths

    paths = report_paths(Path(out).expanduser())
    return [(label, paths["json"]), (f"the .md file beside {label}", paths["markdown"]),
            (f"the .csv file beside {label}", paths["csv"])]


def _list_metrics() -> int:
    from ..evaluation.metrics import METRICS
    from ..evaluation.weights import WEIGHT_FILES

    for name, info in METRICS.items():
        kind = "FR" if info.full_reference else "NR"
        arrow = "↓" if info.lower_better else "↑"
        print(f"{name:12s} {kind} {arrow}  {info.description}")
    print("\nweights: `osdface weights list` (files: " + ", ".join(w.filename for w in WEIGHT_FILES.values()) + ")")
    return 0


def run(args) -> int:
    from ..evaluation.folder import evaluate_folder

    if args.list_metrics:
        return _list_metrics()
    if not args.pred:
        raise CLIError("--pred is required")
    metrics = _parse_metrics(args.metrics)
    # every file this run writes, checked before any metric is built: never an input image
    inputs = _images("--pred", args.pred)
    if args.gt:
        inputs += _images("--gt", args.gt)
    if args.compare and args.lq:
        inputs += _images("--lq", args.lq)
    named = _report_outputs("--out", args.out) + ([("--compare", args.compare)] if args.compare else [])
    out, *_ = check_output_files(named, inputs=inputs, overwrite=args.overwrite)
    # set-up problems (a metric needs --gt, a missing or malformed weight or --fid-stats file, no
    # images) are OSDFaceErrors: osdface.cli.main prints them
    report = evaluate_folder(
        args.pred, args.gt, metrics, device=_device(args.device), weights_dir=args.weights_dir,
        batch_size=args.batch_size, fid_stats=args.fid_stats, use_fid_cache=not args.no_fid_cache,
        progress=not args.no_progress,
    )
    report.meta["method"] = Path(args.pred).name
    paths = report.save(out)
    print(report.to_markdown(Path(args.pred).name))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.compare:
        from ..evaluation.compare import contact_sheet
        from ..evaluation.folder import list_images

        sheet = contact_sheet(Path(args.compare).expanduser(), list_images(args.pred), args.gt, args.lq, report)
        print(f"wrote {sheet}")
    for prob in report.problems:
        report_error(prob)
    return 1 if report.problems else 0


def run_table(args) -> int:
    from ..evaluation.folder import evaluate_folder, list_images
    from ..evaluation.metrics import create_metric
    from ..evaluation.report import benchmark_table
    from ..utils.io import write_text_atomic

    default = "lpips,dists,niqe,fid" if args.table == "1" else "niqe,fid"
    if args.table == "1" and not args.gt:
        raise CLIError("Table 1 needs --gt (full-reference metrics)")
    methods = {}
    for item in args.results:
        name, _, folder = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        methods[name or Path(folder).name] = folder
    out = None
    if args.out:
        # the table and one report (json/md/csv) per method, checked before any metric is built
        named: list[tuple[str, str | Path]] = [("--out", args.out)]
        out = Path(args.out).expanduser()
        for name in methods:
            check_name_part("method name", name)
            named += _report_outputs(f"the {name} report beside --out", out.with_name(f"{out.stem}_{name}.json"))
        inputs = _images("--gt", args.gt) if args.gt else []
        for folder in methods.values():
            if Path(folder).is_dir():  # a missing folder fails on its own below; the others still run
                inputs += list_images(folder)
        out, *_ = check_output_files(named, inputs=inputs, overwrite=args.overwrite)
    device = _device(args.device)
    metrics = _parse_metrics(args.metrics or default)
    if args.table == "2" and not args.gt:
        metrics = [m for m in metrics if m == "fid" or not _is_fr(m)]
    built = {m: create_metric(m, device=device, weights_dir=args.weights_dir) for m in metrics}
    reports, failed = {}, 0
    for name, folder in methods.items():
        try:
            reports[name] = evaluate_folder(
                folder, args.gt, metrics, device=device, weights_dir=args.weights_dir, batch_size=args.batch_size,
                fid_stats=args.fid_stats, use_fid_cache=not args.no_fid_cache, progress=not args.no_progress,
                built=built,
            )
            reports[name].meta["method"] = name
            failed += bool(reports[name].problems)
        except OSDFaceError as e:  # this method's folder (missing, no images, ...); the others still run
            report_error(f"{name}: {e}")
            failed += 1
    if not reports:
        return 1
    table = benchmark_table(reports, layout="table1" if args.table == "1" else "table2")
    print(table)
    if out is not None:
        write_text_atomic(out, table)
        for name, r in reports.items():
            r.save(out.with_name(f"{out.stem}_{name}.json"))
    return 1 if failed else 0


def _is_fr(name: str) -> bool:
    from ..evaluation.metrics import metric_info

    return metric_info(name).full_reference


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
