"""``osdface restore``: restore aligned face crops (``--aligned``) or whole photos."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS
from .common import CLIError, add_model_args, expand_inputs, load_pipeline_from_args, report_error


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
    p.add_argument("--suffix", default="", help="appended to output stems, e.g. _restored")
    p.add_argument("--latent", default="mode", choices=["mode", "sample"],
                   help="VAE latent: deterministic posterior mode (default) or a sample as the official script")
    p.add_argument("--seed", type=int, default=0, help="seed for --latent sample (per image)")
    p.add_argument("--rounding", default="round", choices=["round", "truncate"],
                   help="float→uint8: round (default) or truncate like the official script")
    add_model_args(p)
    from .restore_photos import add_face_args

    add_face_args(p)
    p.set_defaults(run=run)


def _output_path(out_dir: Path, src: Path, args) -> Path:
    from .restore_photos import VIDEO_EXTENSIONS

    ext = "mp4" if src.suffix.lower() in VIDEO_EXTENSIONS and not args.aligned else args.ext
    return out_dir / f"{src.stem}{args.suffix}.{ext}"


def plan_outputs(files: list[Path], out_dir: Path, args) -> tuple[list[tuple[Path, Path]], list[str], int]:
    """Pair inputs with outputs; report name collisions, never overwrite an input; honour --skip-existing."""
    jobs, problems, skipped = [], [], 0
    taken: dict[Path, Path] = {}
    for f in files:
        out = _output_path(out_dir, f, args)
        if out.resolve() in taken:
            problems.append(f"{f}: output name {out.name} already used by {taken[out.resolve()]}; rename one input")
            continue
        if out.resolve() == f.resolve():
            problems.append(f"{f}: output would overwrite the input; choose another output folder or --suffix")
            continue
        taken[out.resolve()] = f
        if args.skip_existing and out.exists():
            skipped += 1
            continue
        jobs.append((f, out))
    return jobs, problems, skipped


def run(args) -> int:
    if args.batch_size < 1:
        report_error("--batch-size must be >= 1")
        return 2
    from .restore_photos import VIDEO_EXTENSIONS

    extensions = IMAGE_EXTENSIONS if args.aligned else IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    files, problems = expand_inputs(args.inputs, extensions=extensions)
    out_dir = Path(args.output).expanduser()
    jobs, plan_problems, skipped = plan_outputs(files, out_dir, args)
    problems += plan_problems
    for msg in problems:
        report_error(msg)
    if not jobs:
        if skipped:
            print(f"all {skipped} outputs exist already (--skip-existing)", file=sys.stderr)
        elif not problems:
            report_error("no inputs")
        return 1 if problems else 0
    try:
        pipe = load_pipeline_from_args(args)
    except CLIError as e:
        report_error(str(e))
        return 2
    if args.aligned:
        failed = restore_aligned(pipe, jobs, args)
    else:
        from .restore_photos import restore_photos

        failed = restore_photos(pipe, jobs, args)
    n_bad = len(problems) + failed
    print(f"restored {len(jobs) - failed} of {len(jobs)} inputs into {out_dir}"
          + (f" ({skipped} skipped)" if skipped else "") + (f"; {n_bad} failed" if n_bad else ""), file=sys.stderr)
    return 1 if n_bad else 0


def restore_aligned(pipe, jobs: list[tuple[Path, Path]], args: argparse.Namespace) -> int:
    """Restore aligned crops in batches of equal size; return the number of failed inputs."""
    import torch
    from tqdm import tqdm

    from ..image import ImageError, read_image, save_image, to_tensor, to_uint8

    failed = 0
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
                except (OSError, ImageError) as e:
                    report_error(f"{src}: cannot write {dst}: {e}")
                    failed += 1
        except Exception as e:  # a model failure affects the whole batch; report each file
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
