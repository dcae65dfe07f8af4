"""``osdface restore``: restore aligned face crops (``--aligned``) or whole photos."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS
from .common import (
    CLIError,
    add_model_args,
    add_overwrite_arg,
    check_name_part,
    check_output_dir,
    check_output_files,
    clean_output_dirs,
    expand_inputs,
    image_outputs_inside,
    load_pipeline_from_args,
    report_error,
    written_entry,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="restore faces in photos, or aligned face crops with --aligned",
        description="Restore faces. Inputs are files, folders or globs; each result is written to "
        "OUT_DIR/<input stem>.<ext>. A failing input is reported and the others still run; "
        "the exit code is 1 if any input failed.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--aligned", action="store_true", help="inputs are FFHQ-aligned square face crops")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="faces per pipeline call (default 1)")
    p.add_argument("--skip-existing", action="store_true", help="skip inputs whose output already exists")
    p.add_argument("--ext", default="png", choices=["png", "jpg", "webp"], help="output format (default png)")
    p.add_argument("--suffix", default="",
                   help="appended to output stems, e.g. _restored (no path separators, '..', or leading '.')")
    p.add_argument("--latent", default="mode", choices=["mode", "sample"],
                   help="VAE latent: deterministic posterior mode (default) or a sample as the official script")
    p.add_argument("--seed", type=int, default=0, help="seed for --latent sample (per image)")
    p.add_argument("--rounding", default="round", choices=["round", "truncate"],
                   help="float→uint8: round (default) or truncate like the official script")
    add_model_args(p)
    from .restore_photos import add_face_args

    add_face_args(p)
    add_overwrite_arg(p, "the --report file")
    p.set_defaults(run=run)


def _output_path(out_dir: Path, src: Path, args) -> Path:
    from .restore_photos import VIDEO_EXTENSIONS

    ext = "mp4" if src.suffix.lower() in VIDEO_EXTENSIONS and not args.aligned else args.ext
    return out_dir / f"{src.stem}{args.suffix}.{ext}"


SIDE_FACE_DIRS = ("cropped_faces", "restored_faces", "cmp")


def side_outputs(dst: Path, args) -> tuple[list[Path], list[tuple[Path, re.Pattern]]]:
    """What a whole photo writes besides ``dst``: ``compare/<stem>.<ext>`` and per-face crops.

    Returns (exact paths, ``(folder, name regex)`` for the face crops ``<stem>_NN.<ext>``, whose
    number is known only after detection).
    """
    from .restore_photos import VIDEO_EXTENSIONS

    if args.aligned or dst.suffix.lower() in VIDEO_EXTENSIONS:
        return [], []
    ext = args.ext
    exact = [dst.parent / "compare" / f"{dst.stem}.{ext}"] if getattr(args, "compare", False) else []
    patterns = []
    if getattr(args, "save_faces", False) or not getattr(args, "paste_back", True):
        rx = re.compile(re.escape(dst.stem) + r"_\d{2,}\." + re.escape(ext))
        patterns = [(dst.parent / sub, rx) for sub in SIDE_FACE_DIRS]
    return exact, patterns


def side_dirs(out_dir: Path, args) -> list[Path]:
    """The subfolders of ``out_dir`` this run may write into (whole photos: compare/, face crops)."""
    if args.aligned:
        return []
    dirs = [out_dir / "compare"] if getattr(args, "compare", False) else []
    if getattr(args, "save_faces", False) or not getattr(args, "paste_back", True):
        dirs += [out_dir / sub for sub in SIDE_FACE_DIRS]
    return dirs


def plan_outputs(files: list[Path], out_dir: Path, args) -> tuple[list[tuple[Path, Path]], list[str], int]:
    """Pair inputs with outputs; report name collisions, never overwrite an input; honour --skip-existing.

    An input whose output (or side output: compare sheet, face crop) would replace any input file
    of the run is refused with a problem naming both; the others still run.
    """
    jobs, problems, skipped = [], [], 0
    taken: dict[Path, Path] = {}
    inputs: dict[Path, Path] = {}
    by_folder: dict[Path, list[Path]] = {}
    for f in files:
        for k in {written_entry(f), f.resolve()}:  # the name given and, through symlinks, the file itself
            inputs.setdefault(k, f)
            by_folder.setdefault(k.parent, []).append(k)
    for f in files:
        out = _output_path(out_dir, f, args)
        key = written_entry(out)
        if key in taken:
            problems.append(f"{f}: output name {out.name} already used by {taken[key]}; rename one input")
            continue
        if key in inputs:
            if inputs[key] == f or key == f.resolve():
                problems.append(f"{f}: output would overwrite the input; choose another output folder or --suffix")
            else:
                problems.append(f"{f}: output {out} would overwrite the input {inputs[key]}; "
                                "choose another output folder or --suffix")
            continue
        exact, patterns = side_outputs(out, args)
        clash = next((inputs[written_entry(x)] for x in exact if written_entry(x) in inputs), None)
        if clash is None:
            clash = next((q for folder, rx in patterns for q in by_folder.get(folder.resolve(), [])
                          if rx.fullmatch(q.name)), None)
        if clash is not None:
            problems.append(f"{f}: a side output (--compare/--save-faces) would overwrite the input {clash}; "
                            "choose another output folder or --suffix")
            continue
        taken[key] = f
        if args.skip_existing and out.exists():
            skipped += 1
            continue
        jobs.append((f, out))
    return jobs, problems, skipped


def run(args) -> int:
    from .restore_photos import (
        VIDEO_EXTENSIONS,
        build_face_models,
        face_layer_device,
        restore_photos,
        write_report,
    )

    if args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1")
    check_name_part("--suffix", args.suffix)
    out_dir = check_output_dir("-o", args.output)
    extensions = IMAGE_EXTENSIONS if args.aligned else IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    files, problems = expand_inputs(args.inputs, extensions=extensions)
    jobs, plan_problems, skipped = plan_outputs(files, out_dir, args)
    problems += plan_problems
    # every path this run writes, checked before any model is loaded
    planned, patterns = [], []
    for f in files:
        out = _output_path(out_dir, f, args)
        exact, pats = side_outputs(out, args)
        planned += [out, *exact]
        patterns += pats
    image_outputs_inside(out_dir, planned)
    dirs = side_dirs(out_dir, args)
    if args.report:
        check_output_files([("--report", args.report)], inputs=files, planned=planned, planned_patterns=patterns,
                           out_dirs=[out_dir, *dirs], overwrite=args.overwrite)
    for msg in problems:
        report_error(msg)
    if not jobs:
        if skipped:
            print(f"all {skipped} outputs exist already (--skip-existing)", file=sys.stderr)
        elif not problems:
            report_error("no inputs")
        return 1 if problems else 0
    # face-layer files first: a refused detector/parser/upsampler file costs no diffusion-model load
    face_models = None if args.aligned else build_face_models(args, face_layer_device(args))
    pipe = load_pipeline_from_args(args)
    clean_output_dirs(out_dir, *dirs)
    report: list[dict] = []
    if args.aligned:
        failed = restore_aligned(pipe, jobs, args, report)
    else:
        failed = restore_photos(pipe, jobs, args, report, face_models)
    report_failed = bool(args.report) and not write_report(args.report, report)
    n_bad = len(problems) + failed
    print(f"restored {len(jobs) - failed} of {len(jobs)} inputs into {out_dir}"
          + (f" ({skipped} skipped)" if skipped else "") + (f"; {n_bad} failed" if n_bad else ""), file=sys.stderr)
    return 1 if n_bad or report_failed else 0


def restore_aligned(pipe, jobs: list[tuple[Path, Path]], args: argparse.Namespace,
                    report: list[dict] | None = None) -> int:
    """Restore aligned crops in batches of equal size; return the number of failed inputs.

    ``report``, if given, receives one ``{"input", "output", "faces": []}`` entry per job, in job
    order (``output`` is ``None`` where the input failed; no detection runs on aligned crops).
    """
    import torch
    from tqdm import tqdm

    from ..image import ImageError, read_image, save_image, to_tensor, to_uint8

    failed = 0
    entries = {src: {"input": str(src), "output": None, "faces": []} for src, _ in jobs}
    if report is not None:
        report.extend(entries.values())
    pending: dict[tuple[int, int], list[tuple[Path, Path, object]]] = {}
    bar = tqdm(total=len(jobs), desc="restore", unit="face", disable=None)

    def flush(items):
        nonlocal failed
        srcs = [s for s, _, _ in items]
        try:
            x = torch.cat([t for _, _, t in items])
            if pipe.device.type == "cuda":
                x = x.pin_memory()  # the pipeline then copies it to the GPU without blocking
            gen = None
            if args.latent == "sample":
                gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
            out = to_uint8(pipe(x, latent=args.latent, generator=gen).images, args.rounding)
            for (src, dst, _), img in zip(items, out):
                try:
                    save_image(dst, img)
                    entries[src]["output"] = str(dst)
                except (OSError, ImageError) as e:
                    report_error(f"{src}: cannot write {dst}: {e}")
                    failed += 1
        except Exception as e:  # noqa: BLE001 - a model failure fails this batch's inputs; the rest still run
            logging.getLogger("osdface.cli.restore").debug("batch of %d failed", len(srcs), exc_info=True)  # -v
            for s in srcs:
                report_error(f"{s}: restoration failed: {e}")
            failed += len(srcs)
        bar.update(len(items))

    for src, dst in jobs:
        try:
            img = read_image(src)
            h, w = img.rgb.shape[:2]
            if h != w:
                raise ImageError(f"{src}: --aligned needs square face crops, got {w}x{h}")
            pending.setdefault((h, w), []).append((src, dst, to_tensor(img.rgb)))
        except ImageError as e:
            report_error(str(e))
            failed += 1
            bar.update(1)
            continue
        for size, items in list(pending.items()):
            if len(items) >= args.batch_size:
                flush(items)
                del pending[size]
    for items in pending.values():
        flush(items)
    bar.close()
    return failed
