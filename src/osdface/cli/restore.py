"""``osdface restore``: restore aligned face crops (``--aligned``) or whole photos."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path, PurePosixPath

from ..constants import DEFAULT_BATCH_SIZE, IMAGE_EXTENSIONS
from .common import (
    CLIError,
    add_model_args,
    add_overwrite_arg,
    check_name_part,
    check_output_dir,
    check_output_files,
    clean_output_dirs,
    image_outputs_inside,
    load_pipeline_from_args,
    report_error,
    written_entry,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="restore faces in photos, or aligned face crops with --aligned",
        description="Restore faces. Inputs are files, folders or globs (and --input-list). A file named "
        "directly is written to OUT_DIR/<stem>.<ext>; a folder is scanned recursively and its tree mirrored "
        "(FOLDER/a/b/x.jpg -> OUT_DIR/a/b/x.<ext>). A failing input is reported and the others still run; "
        "the exit code is 1 if any input failed.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    p.add_argument("-i", "--input", dest="input_opt", action="append", metavar="INPUT",
                   help="an input as an option (GFPGAN/CodeFormer style; repeatable; same as INPUT)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--input-list", metavar="FILE",
                   help="more inputs, one path per line ('-' = standard input); relative paths are relative to "
                        "the list's folder, whose tree the outputs mirror")
    p.add_argument("--shard", metavar="K/N",
                   help="restore only part K of N of the sorted input list (N processes cover every photo once)")
    p.add_argument("--aligned", action="store_true", help="inputs are FFHQ-aligned square face crops")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"faces per pipeline call (default {DEFAULT_BATCH_SIZE}, as FaceRestorer)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose output already exists; with an existing --report FILE.jsonl: skip the "
                        "inputs it reports and append the rest")
    p.add_argument("--ext", default="png", choices=["png", "jpg", "webp", "auto"],
                   help="output format (default png; auto: the input's own format)")
    p.add_argument("--suffix", default="",
                   help="appended to output stems, e.g. _restored (no path separators, '..', or leading '.')")
    p.add_argument("--latent", default="mode", choices=["mode", "sample"],
                   help="VAE latent: deterministic posterior mode (default) or a sample as the official script")
    p.add_argument("--seed", type=int, default=0, help="seed for --latent sample (per image)")
    p.add_argument("--rounding", default="round", choices=["round", "truncate"],
                   help="float→uint8: round (default) or truncate like the official script")
    g = p.add_argument_group("collections: engines (whole photos)")
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (default): this process, file work overlapping the model; ray: Ray Data across "
                        "GPUs and machines (pip install 'osdface[scale]')")
    g.add_argument("--prefetch", type=int, default=8, metavar="N",
                   help="local engine: photos queued before and after the model stage (0 = no overlap; default 8)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to join ('auto', 'ray://HOST:10001'); default: start a local Ray")
    g.add_argument("--workers", type=int, default=1, metavar="N", help="Ray model workers (default 1)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per Ray model worker (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                   help="CPUs per Ray model worker (default 1; on CPUs its torch threads)")
    add_model_args(p)
    from .restore_photos import add_face_args

    add_face_args(p)
    add_overwrite_arg(p, "the --report file")
    p.set_defaults(run=run)


def _output_path(out_dir: Path, src, args) -> Path:
    """Where ``src`` (a path: flat name; an :class:`~osdface.batch.inputs.InputPhoto`: its mirrored
    place) is written: ``.mp4`` for videos, else ``--ext`` (``auto``: the input's own format)."""
    from ..batch.inputs import InputPhoto
    from .restore_photos import VIDEO_EXTENSIONS

    photo = src if isinstance(src, InputPhoto) else InputPhoto(Path(src), PurePosixPath(Path(src).stem))
    ext = "mp4" if photo.path.suffix.lower() in VIDEO_EXTENSIONS and not args.aligned else args.ext
    return photo.output(out_dir, ext, args.suffix)


SIDE_FACE_DIRS = ("cropped_faces", "restored_faces", "cmp")


def side_outputs(dst: Path, args) -> tuple[list[Path], list[tuple[Path, re.Pattern]]]:
    """What a whole photo writes besides ``dst``: ``compare/<stem>.<ext>`` and per-face crops.

    Returns (exact paths, ``(folder, name regex)`` for the face crops ``<stem>_NN.<ext>``, whose
    number is known only after detection).
    """
    from .restore_photos import VIDEO_EXTENSIONS

    if args.aligned or dst.suffix.lower() in VIDEO_EXTENSIONS:
        return [], []
    ext = dst.suffix.lstrip(".")
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


_CROP_NAME = re.compile(r"(.*)_\d{2,}\.([^.]*)")


def _crop_key(key: Path) -> tuple[Path, str, str] | None:
    """``(folder, stem, ext)`` when ``key`` is named like a face crop ``<stem>_NN.<ext>``."""
    m = _CROP_NAME.fullmatch(key.name)
    return (key.parent, m[1], m[2]) if m else None


def _plan(files: list, out_dir: Path, args) -> list[tuple[Path, Path | None, str | None]]:
    """Pair inputs with outputs: ``(input, output or None, problem or None)`` per input, in order.

    ``files`` are paths (flat output names) or :class:`~osdface.batch.inputs.InputPhoto` (mirrored
    places). An input whose output (or side output: compare sheet, face crop) would replace any
    input file of the run, or an output (or side output) of an earlier input, gets a problem naming
    both instead of an output; the others still run.
    """
    from ..batch.inputs import InputPhoto

    photos = [f if isinstance(f, InputPhoto) else InputPhoto(Path(f), PurePosixPath(Path(f).stem)) for f in files]
    plan: list[tuple[Path, Path | None, str | None]] = []
    taken: dict[Path, Path] = {}
    inputs: dict[Path, Path] = {}
    by_folder: dict[Path, list[Path]] = {}
    for ph in photos:
        f = ph.path
        for k in {written_entry(f), f.resolve()}:  # the name given and, through symlinks, the file itself
            inputs.setdefault(k, f)
            by_folder.setdefault(k.parent, []).append(k)
    # face crops (<stem>_NN.<ext>, their number known only after detection) of the inputs so far, and the
    # outputs so far named like one: (folder, stem, ext) -> input; dicts, so a large run plans in linear time
    crops_taken: dict[tuple[Path, str, str], Path] = {}
    crop_named: dict[tuple[Path, str, str], Path] = {}
    for ph in photos:
        f = ph.path
        out = _output_path(out_dir, ph, args)
        key = written_entry(out)
        user = taken.get(key) or crops_taken.get(_crop_key(key))
        if user is not None:
            plan.append((f, None, f"{f}: output name {out.relative_to(out_dir)} already used by {user}; "
                                  "rename one input"))
            continue
        if key in inputs:
            if inputs[key] == f or key == f.resolve():
                msg = f"{f}: output would overwrite the input; choose another output folder or --suffix"
            else:
                msg = (f"{f}: output {out} would overwrite the input {inputs[key]}; "
                       "choose another output folder or --suffix")
            plan.append((f, None, msg))
            continue
        exact, patterns = side_outputs(out, args)
        clash = next((inputs[written_entry(x)] for x in exact if written_entry(x) in inputs), None)
        if clash is None:
            clash = next((q for folder, rx in patterns for q in by_folder.get(folder.resolve(), [])
                          if rx.fullmatch(q.name)), None)
        if clash is not None:
            plan.append((f, None, f"{f}: a side output (--compare/--save-faces) would overwrite the input {clash}; "
                                  "choose another output folder or --suffix"))
            continue
        crops = {(folder.resolve(), out.stem, out.suffix.lstrip(".")): folder for folder, _ in patterns}
        side = next(((x.relative_to(out_dir), g) for x in exact
                     if (g := taken.get(written_entry(x)) or crops_taken.get(_crop_key(written_entry(x))))), None)
        side = side or next(((f"{crops[c].relative_to(out_dir)}/{c[1]}_NN.{c[2]}", crop_named[c])
                             for c in crops if c in crop_named), None)
        if side is not None:
            plan.append((f, None, f"{f}: side output (--compare/--save-faces) {side[0]} already used by {side[1]}; "
                                  "rename one input"))
            continue
        for k in (key, *map(written_entry, exact)):
            taken[k] = f
            if _crop_key(k) is not None:
                crop_named.setdefault(_crop_key(k), f)
        crops_taken.update((c, f) for c in crops)
        plan.append((f, out, None))
    return plan


def _collect(args, out_dir: Path, extensions) -> tuple[list, list[str]]:
    """The inputs of the command line and of ``--input-list``, duplicates dropped."""
    from ..batch.inputs import collect_inputs, read_input_list, unique_photos

    photos, problems = collect_inputs(args.inputs, extensions, recursive=True, exclude=[out_dir])
    if args.input_list:
        entries, root = read_input_list(args.input_list)
        more, more_problems = collect_inputs(entries, extensions, recursive=True, exclude=[out_dir],
                                             list_root=root)
        photos += more
        problems += more_problems
    return unique_photos(photos), problems


def run(args) -> int:
    from .restore_photos import VIDEO_EXTENSIONS

    if args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1")
    args.inputs = list(args.inputs) + list(getattr(args, "input_opt", None) or [])  # INPUT ... and -i/--input
    if not args.inputs and not args.input_list:
        raise CLIError("give INPUT paths, --input-list FILE, or both")
    check_name_part("--suffix", args.suffix)
    out_dir = check_output_dir("-o", args.output)
    from .weights import require_weights_from_args

    require_weights_from_args(args)  # first run: every missing model file, before any heavy import
    ray_engine = args.engine == "ray"
    if ray_engine and args.aligned:
        raise CLIError("--engine ray restores whole photos; run --aligned without --engine ray")
    if args.ext == "auto" and args.aligned:
        raise CLIError("--ext auto is for whole photos; give --ext png, jpg or webp with --aligned")
    if args.workers < 1:
        raise CLIError("--workers must be >= 1")
    if args.prefetch < 0:
        raise CLIError("--prefetch must be >= 0")
    if ray_engine:
        import importlib.util

        from .restore_photos import model_resolution_from_args

        if importlib.util.find_spec("ray") is None:
            raise CLIError("--engine ray needs Ray Data: pip install 'osdface[scale]'")
        model_resolution_from_args(args)  # a model folder is needed: refused here, before any work
    shard = None
    if args.shard:
        from ..batch.inputs import parse_shard

        shard = parse_shard(args.shard)
    extensions = IMAGE_EXTENSIONS if args.aligned else IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    photos, problems = _collect(args, out_dir, extensions)
    # output-name collisions are decided in path order, so which input wins (and so every shard's
    # part) does not depend on the order of the arguments; the plan keeps the input order
    by_path = sorted(range(len(photos)), key=lambda i: (str(photos[i].path), i))
    plan = [None] * len(photos)
    for i, entry in zip(by_path, _plan([photos[i] for i in by_path], out_dir, args)):
        plan[i] = entry
    if shard is not None:
        from ..batch.inputs import shard_indices

        plan = [plan[i] for i in shard_indices([p[0] for p in plan], *shard)]
    if ray_engine:
        plan = [(f, None, f"{f}: --engine ray restores photos, not videos; run videos without --engine ray")
                if out is not None and f.suffix.lower() in VIDEO_EXTENSIONS else (f, out, problem)
                for f, out, problem in plan]
    files = [ph.path for ph in photos]
    # every path this run writes, checked before any model is loaded
    planned, patterns = [], []
    for _, out, _ in plan:
        if out is not None:
            exact, pats = side_outputs(out, args)
            planned += [out, *exact]
            patterns += pats
    image_outputs_inside(out_dir, planned)
    dirs = side_dirs(out_dir, args)
    streaming = bool(args.report) and str(args.report).endswith(".jsonl")
    resume = streaming and args.skip_existing and Path(args.report).expanduser().is_file()
    if args.report:
        check_output_files([("--report", args.report)], inputs=files, planned=planned, planned_patterns=patterns,
                           out_dirs=[out_dir, *dirs], overwrite=args.overwrite or resume)
    done: set[str] = set()
    if resume:
        from ..batch.report import read_rows

        done = {r["input"] for r in read_rows(Path(args.report).expanduser())[0]}
    return _run_planned(args, out_dir, plan, problems, streaming, resume, done)


class _StreamingReport:
    """The ``--report FILE.jsonl`` of this run, opened at the first row: a set-up error (a refused
    model) leaves no report file behind."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path, self.resume, self.file = path, resume, None

    def write(self, row: dict) -> None:
        try:
            if self.file is None:
                from ..batch.report import JsonlReport

                self.file = JsonlReport(self.path, resume=self.resume)
            self.file.write(row)
        except OSError as e:  # a full disk, a vanished folder: the run stops, the rows so far are kept
            raise CLIError(f"{self.path}: cannot write the report: {e}") from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _run_planned(args, out_dir: Path, plan, problems: list[str], streaming: bool, resume: bool,
                 done: set[str]) -> int:
    from ..batch.stages import failure_row
    from .face_quality_args import IdentityTotals, collect_identity, identity_summary
    from .restore_photos import build_face_models, face_layer_device, restore_photos, write_report

    jobs, skipped, problem_rows, identities = [], 0, [], IdentityTotals()
    for f, out, problem in plan:
        if resume and str(f) in done:
            skipped += 1
        elif problem is not None:
            problems.append(problem)
            problem_rows.append(failure_row(_job(f, out), problem))
        elif args.skip_existing and not resume and out.exists():
            skipped += 1
        else:
            jobs.append((f, out))
    for msg in problems:
        report_error(msg)
    report = _StreamingReport(Path(args.report).expanduser(), resume) if streaming else None
    try:
        if not jobs:
            _write_rows(report, problem_rows)
            if skipped:
                print(f"all {skipped} outputs exist already (--skip-existing)", file=sys.stderr)
            elif not problems:
                report_error("no inputs")
            return 1 if problems else 0
        summary: list[dict] = []
        on_row = report.write if report is not None else summary.append
        on_row = collect_identity(on_row, identities)
        lost = 0
        if args.engine == "ray":
            _write_rows(report, problem_rows)
            clean_output_dirs(*_output_folders(out_dir, jobs, args))
            failed, lost = _run_ray(args, jobs, on_row)
        else:
            # face-layer files first: a refused detector/parser/upsampler file costs no diffusion-model load
            face_models = None if args.aligned else build_face_models(args, face_layer_device(args))
            pipe = load_pipeline_from_args(args)
            clean_output_dirs(*_output_folders(out_dir, jobs, args))
            _write_rows(report, problem_rows)
            if args.aligned:
                failed = restore_aligned(pipe, jobs, args, on_row=on_row)
            else:
                failed = restore_photos(pipe, jobs, args, on_row=on_row, face_models=face_models)
    finally:
        if report is not None:
            report.close()
    report_failed = False
    if args.report and report is None:
        order = {str(s): i for i, (s, _) in enumerate(jobs)}
        summary.sort(key=lambda e: order.get(e["input"], len(order)))
        report_failed = not write_report(args.report, [{k: e[k] for k in ("input", "output", "faces")}
                                                       for e in summary])
    n_bad = len(problems) + failed + lost
    if identity_summary(identities):
        print(identity_summary(identities), file=sys.stderr)
    print(f"restored {len(jobs) - failed - lost} of {len(jobs)} inputs into {out_dir}"
          + (f" ({skipped} skipped)" if skipped else "") + (f"; {n_bad} failed" if n_bad else ""), file=sys.stderr)
    return 1 if n_bad or report_failed else 0


def _write_rows(report: _StreamingReport | None, rows: list[dict]) -> None:
    """The rows of refused inputs into the streaming report (none without one)."""
    for row in rows if report is not None else []:
        report.write(row)


def _output_folders(out_dir: Path, jobs: list[tuple[Path, Path]], args) -> list[Path]:
    """Every folder the jobs write into (mirrored trees: each output's folder and its side folders),
    where a killed run may have left temporaries."""
    folders = {out_dir, *side_dirs(out_dir, args)}
    for _, out in jobs:
        folders.add(out.parent)
        folders.update(side_dirs(out.parent, args))
    return sorted(folders)


def _job(f: Path, out: Path | None):
    from ..batch.stages import PhotoJob

    return PhotoJob(f, out if out is not None else f)


def _run_ray(args, jobs: list[tuple[Path, Path]], on_row) -> tuple[int, int]:
    """``--engine ray``: the photos on Ray Data; returns (failed photos, lost photos)."""
    import functools

    from tqdm import tqdm

    from ..batch.ray_engine import RayStages, restore_collection_ray
    from ..batch.stages import PhotoJob, WriteOptions
    from .restore_photos import (
        face_stage_restorer,
        model_resolution_from_args,
        model_stage_restorer,
        row_printer,
    )

    face_size = model_resolution_from_args(args)  # checked before any work in run(); configs only, cheap
    stages = RayStages(face_stage=functools.partial(face_stage_restorer, args, face_size),
                       model_stage=functools.partial(model_stage_restorer, args),
                       options=WriteOptions(compare=args.compare, save_faces=args.save_faces))
    bar = tqdm(total=len(jobs), desc="restore", unit="photo", disable=None)
    show = row_printer(bar)

    def row(r: dict) -> None:
        on_row(r)
        show(r)

    init = {"_node_ip_address": "127.0.0.1"} if not args.ray_address else {}
    stats = restore_collection_ray(
        [PhotoJob(s, d) for s, d in jobs], stages, row, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        photos_per_call=max(args.batch_size, 1), address=args.ray_address, init_kwargs=init)
    bar.close()
    if stats.lost:
        names = ", ".join(stats.lost[:10]) + (f" and {len(stats.lost) - 10} more" if len(stats.lost) > 10 else "")
        report_error(f"{len(stats.lost)} photos not restored ({stats.lost_reason}): {names}; "
                     "re-run with --skip-existing to restore them")
    return stats.failed, len(stats.lost)


def restore_aligned(pipe, jobs: list[tuple[Path, Path]], args: argparse.Namespace,
                    report: list[dict] | None = None, on_row=None) -> int:
    """Restore aligned crops in batches of equal size; return the number of failed inputs.

    ``report``, if given, receives one ``{"input", "output", "faces": []}`` entry per job, in job
    order (``output`` is ``None`` where the input failed; no detection runs on aligned crops).
    ``on_row``, if given, is called with each input's row ``{"input", "output", "faces", "error"}``
    as soon as it is written or has failed (the streaming ``--report FILE.jsonl``).
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

    def done(src: Path, error: str | None = None) -> None:
        if error is not None:
            report_error(error)
        if on_row is not None:
            on_row({**entries[src], "error": error})

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
        except Exception as e:  # noqa: BLE001 - a model failure fails this batch's inputs; the rest still run
            logging.getLogger("osdface.cli.restore").debug("batch of %d failed", len(srcs), exc_info=True)  # -v
            for s in srcs:
                done(s, f"{s}: restoration failed: {e}")
            failed += len(srcs)
            bar.update(len(items))
            return
        for (src, dst, _), img in zip(items, out):
            try:
                save_image(dst, img)
                entries[src]["output"] = str(dst)
                done(src)
            except (OSError, ImageError) as e:
                done(src, f"{src}: cannot write {dst}: {e}")
                failed += 1
        bar.update(len(items))

    for src, dst in jobs:
        try:
            img = read_image(src)
            h, w = img.rgb.shape[:2]
            if h != w:
                raise ImageError(f"{src}: --aligned needs square face crops, got {w}x{h}")
            pending.setdefault((h, w), []).append((src, dst, to_tensor(img.rgb)))
        except ImageError as e:
            done(src, str(e))
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
