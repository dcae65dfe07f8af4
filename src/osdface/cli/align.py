"""``osdface align``: cut FFHQ-aligned face crops out of ordinary photos (for training/test sets)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .common import (
    CLIError,
    add_overwrite_arg,
    check_output_dir,
    check_output_files,
    clean_output_dirs,
    expand_inputs,
    report_error,
    written_entry,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "align",
        help="cut FFHQ-aligned square face crops out of photos",
        description="Detect faces and write one FFHQ-aligned crop per face to OUT_DIR/<stem>_NN.<ext> "
        "(NN = face index, best detection first). Photos without faces are reported, not errors.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--size", type=int, default=512, metavar="PX", help="crop side (default 512)")
    p.add_argument("--ext", default="png", choices=["png", "jpg", "webp"], help="output format (default png)")
    p.add_argument("--border", default="constant", choices=["constant", "reflect", "reflect101", "replicate"],
                   help="fill of crop pixels outside the photo (default: facexlib's grey)")
    p.add_argument("--detector", default="yunet", help="yunet (default), retinaface_resnet50, retinaface_mobile0.25")
    p.add_argument("--detector-weights", metavar="FILE", help="detector weight file")
    p.add_argument("--det-threshold", type=float, metavar="T", help="detection confidence threshold")
    p.add_argument("--max-faces", type=int, default=0, metavar="N", help="at most N faces per photo (largest)")
    p.add_argument("--min-face-size", type=float, default=0, metavar="PX", help="ignore faces smaller than PX")
    p.add_argument("--only-center-face", action="store_true", help="only the face closest to the centre")
    p.add_argument("--report", metavar="FILE", help="JSON report (same format as 'osdface restore --report'); "
                   "never an input or a crop of the run; an existing FILE needs --overwrite")
    add_overwrite_arg(p, "the --report file")
    p.set_defaults(run=run)


def _crop_pattern(src: Path, ext: str) -> re.Pattern:
    """Names of ``src``'s crops: ``<stem>_NN.<ext>`` (NN = face index, two or more digits)."""
    return re.compile(re.escape(src.stem) + r"_\d{2,}\." + re.escape(ext))


def plan_crops(files: list[Path], out_dir: Path, ext: str) -> tuple[list[Path], list[str]]:
    """Inputs whose crops can be written: not onto an input file, not sharing a stem with another input.

    Returns (inputs to align, problems naming the refused inputs).
    """
    root = out_dir.resolve()
    in_out = [f for f in files if written_entry(f).parent == root]  # inputs a crop could replace
    jobs, problems, taken = [], [], {}
    for f in files:
        rx = _crop_pattern(f, ext)
        if f.stem in taken:
            problems.append(f"{f}: crop names {f.stem}_NN.{ext} already used by {taken[f.stem]}; rename one input")
            continue
        clash = next((q for q in in_out if rx.fullmatch(q.name)), None)
        if clash is not None:
            problems.append(f"{f}: a crop would overwrite the input {clash}; choose another output folder")
            continue
        taken[f.stem] = f
        jobs.append(f)
    return jobs, problems


def run(args) -> int:
    from tqdm import tqdm

    from ..face import align_faces, create_detector
    from ..image import ImageError, read_image, save_image
    from .restore_photos import write_report

    if args.size < 8:
        raise CLIError("--size must be at least 8")
    out_dir = check_output_dir("-o", args.output)
    inputs, problems = expand_inputs(args.inputs)
    files, plan_problems = plan_crops(inputs, out_dir, args.ext)
    problems += plan_problems
    if args.report:
        check_output_files([("--report", args.report)], inputs=inputs, out_dirs=[out_dir], overwrite=args.overwrite,
                           planned_patterns=[(out_dir, _crop_pattern(f, args.ext)) for f in inputs])
    for msg in problems:
        report_error(msg)
    if not files:
        return 1 if problems else 0
    detector = create_detector(args.detector, weights=args.detector_weights, score_threshold=args.det_threshold)
    clean_output_dirs(out_dir)
    failed, n_faces, report = len(problems), 0, []
    for src in tqdm(files, desc="align", unit="photo", disable=None):
        entry = {"input": str(src), "output": None, "faces": []}
        report.append(entry)
        try:
            img = read_image(src)
            crops = align_faces(img, detector, size=args.size, border=args.border, max_faces=args.max_faces or None,
                                min_face_size=args.min_face_size, only_center_face=args.only_center_face)
        except ImageError as e:
            report_error(str(e))
            failed += 1
            continue
        if not crops:
            print(f"{src}: no face found", file=sys.stderr)
        outputs = []
        for i, c in enumerate(crops):
            dst = out_dir / f"{src.stem}_{i:02d}.{args.ext}"
            try:
                save_image(dst, c.lq)
            except (OSError, ImageError) as e:
                report_error(f"{src}: cannot write {dst}: {e}")
                failed += 1
                break
            outputs.append(str(dst))
            entry["faces"].append({**c.detection.to_json(), "crop": str(dst)})
        entry["output"] = outputs[0] if outputs else None
        n_faces += len(outputs)
    report_failed = bool(args.report) and not write_report(args.report, report)
    print(f"aligned {n_faces} faces from {len(files)} photos into {out_dir}" + (f"; {failed} failed" if failed else ""),
          file=sys.stderr)
    return 1 if failed or report_failed else 0
