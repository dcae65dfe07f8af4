"""Whole-photo (and video) mode of ``osdface restore``: a thin layer over :class:`osdface.face.FaceRestorer`.

Kept importable without torch: heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import report_error

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def add_face_args(p: argparse.ArgumentParser) -> None:
    """The whole-photo options (GFPGAN/CodeFormer vocabulary)."""
    g = p.add_argument_group("whole photos (default mode): detection, paste-back, outputs")
    g.add_argument("--detector", default="yunet",
                   help="face detector: yunet (default, offline), retinaface_resnet50, retinaface_mobile0.25")
    g.add_argument("--detector-weights", metavar="FILE", help="detector weight file (RetinaFace .pth, YuNet .onnx)")
    g.add_argument("--det-threshold", type=float, metavar="T",
                   help="detection confidence threshold (default: yunet 0.6, retinaface 0.9)")
    g.add_argument("--nms-threshold", type=float, metavar="T", help="IoU threshold of the detector's NMS")
    g.add_argument("--max-faces", type=int, default=0, metavar="N", help="restore at most N faces (the largest)")
    g.add_argument("--min-face-size", type=float, default=0, metavar="PX",
                   help="ignore faces smaller than PX pixels (longer box side)")
    g.add_argument("--only-center-face", action="store_true", help="restore only the face closest to the centre")
    g.add_argument("-s", "--upscale", type=float, default=1, metavar="N",
                   help="output scale of the whole photo (default 1)")
    g.add_argument("--bg-upsampler", default="lanczos", metavar="NAME|FILE",
                   help="background for --upscale (and faces for --face-size): lanczos (default), bicubic, "
                        "bilinear, area, nearest, realesrgan (RealESRGAN_x2plus.pth or _x4plus.pth in "
                        "$OSDFACE_HOME/face/), or a Real-ESRGAN RRDBNet .pth file")
    g.add_argument("--bg-tile", type=int, default=400, metavar="PX", help="tile size of a background model (0 = none)")
    g.add_argument("--color-fix", default="wavelet", choices=["wavelet", "adain", "none"],
                   help="colour correction of restored faces against their input (default wavelet)")
    g.add_argument("--parsing-model", metavar="FILE",
                   help="facexlib parsing_parsenet.pth: paste only the face (skin, features, hair); "
                        "background, neck, clothes and hats stay from the input")
    g.add_argument("--no-paste-back", dest="paste_back", action="store_false",
                   help="do not paste faces back; write the restored face crops only")
    g.add_argument("--save-faces", action="store_true",
                   help="also write OUT/cropped_faces/, OUT/restored_faces/ and OUT/cmp/ (per face)")
    g.add_argument("--compare", action="store_true", help="write OUT/compare/<stem>.png: input | output side by side")
    g.add_argument("--report", metavar="FILE",
                   help="write a JSON report of inputs, outputs and faces (with --aligned: inputs and outputs); "
                        "FILE.jsonl: one line per input, appended as each is written (resumable with "
                        "--skip-existing); never an input or an output of the run; an existing FILE needs "
                        "--overwrite (or, for .jsonl, --skip-existing to append)")
    g.add_argument("--no-smooth", dest="smooth", action="store_false",
                   help="videos: no landmark smoothing across frames")
    from . import face_quality_args

    face_quality_args.add_args(g)


def face_layer_device(args) -> str:
    """Where the face-layer models run: the pipeline's device for the torch backend; the CPU for the
    exported runners (their host code is on the CPU). Known before any model is loaded."""
    from .common import resolve_backend

    if resolve_backend(args) != "torch":
        return "cpu"
    from ..pipelines.pipeline_osdface import resolve_device

    return str(resolve_device(getattr(args, "device", "auto")))


def build_face_models(args, device: str) -> dict:
    """The detector, the optional parsing model and the background upsampler of ``args``.

    Built before the diffusion model is loaded, so that a missing or refused face-layer file costs no
    model load (one line, exit 2, through :func:`osdface.cli.main`).
    """
    from ..face import create_detector
    from ..face.background import create_bg_upsampler
    from ..face.parsing import FaceParser

    name = getattr(args, "detector", "yunet")
    extra = {"device": device} if name.startswith("retinaface") else {}
    detector = create_detector(name, weights=getattr(args, "detector_weights", None),
                               score_threshold=getattr(args, "det_threshold", None),
                               nms_threshold=getattr(args, "nms_threshold", None), **extra)
    parser = FaceParser.from_file(args.parsing_model, device=device) if getattr(args, "parsing_model", None) else None
    bg = create_bg_upsampler(getattr(args, "bg_upsampler", "lanczos"), device=device,
                             tile=getattr(args, "bg_tile", 400))
    return {"detector": detector, "parser": parser, "bg_upsampler": bg}


def build_restorer(pipe, args, face_models: dict | None = None, face_size: int | None = None):
    """A :class:`~osdface.face.FaceRestorer` over ``pipe`` with the face models of ``args`` (built here
    unless given by :func:`build_face_models`). ``face_size``: the crop side when ``pipe`` is ``None``
    (a restorer for the detect/align and paste stages only)."""
    from ..face import FaceRestorer
    from .face_quality_args import restorer_kwargs

    models = face_models if face_models is not None else build_face_models(args, face_layer_device(args))
    return FaceRestorer(
        pipe, detector=models["detector"], upscale=getattr(args, "upscale", 1), face_size=face_size,
        color_fix=getattr(args, "color_fix", "wavelet"), paste_back=getattr(args, "paste_back", True),
        bg_upsampler=models["bg_upsampler"], parser=models["parser"],
        max_faces=getattr(args, "max_faces", 0) or None, min_face_size=getattr(args, "min_face_size", 0),
        only_center_face=getattr(args, "only_center_face", False), batch_size=getattr(args, "batch_size", 1),
        latent=getattr(args, "latent", "mode"), seed=getattr(args, "seed", 0), **restorer_kwargs(args),
    )


def face_stage_restorer(args, face_size: int):
    """``--engine ray`` CPU stages (read/detect/align, paste/write): the face models of ``args`` on the
    CPU and no pipeline. Called on the Ray workers (``functools.partial`` shipped by pickle)."""
    return build_restorer(None, args, build_face_models(args, "cpu"), face_size=face_size)


def model_stage_restorer(args):
    """``--engine ray`` model actors: the pipeline of ``args`` (loaded once per actor, on the GPU Ray
    gives it, else the CPU) and the model-side settings (colour fix, batch size, latent); no detector."""
    from ..face import FaceRestorer
    from .common import load_pipeline_from_args

    pipe = load_pipeline_from_args(args)
    return FaceRestorer(pipe, detector=None, color_fix=getattr(args, "color_fix", "wavelet"), bg_upsampler=None,
                        batch_size=getattr(args, "batch_size", 1), latent=getattr(args, "latent", "mode"),
                        seed=getattr(args, "seed", 0), fidelity=getattr(args, "fidelity", 0.0))


def model_resolution_from_args(args) -> int:
    """The crop side of the model ``args`` names, read from its folder's configs (no weights loaded):
    ``--engine ray`` aligns faces on CPU workers before any model actor exists.

    Raises:
        CLIError: the model is given as --base-model/--weights (convert it to a folder first).
    """
    from .common import CLIError, resolve_backend

    if resolve_backend(args) != "torch":
        from ..io.onnx_format import read_manifest

        return int(read_manifest(args.model)["resolution"])
    from ..io.model_folders import read_model_folder
    from ..io.names import MODEL_INDEX
    from ..weights import default_model_dir

    model = args.model
    if model is None and not (args.base_model or args.weights) and (default_model_dir() / MODEL_INDEX).is_file():
        model = default_model_dir()
    if model is None:
        raise CLIError("--engine ray needs a model folder (--model MODEL_DIR): make one with "
                       "'osdface convert --base-model SD_DIR --weights OSDFACE_DIR -o MODEL_DIR'")
    return read_model_folder(model).resolution


def row_printer(bar):
    """Per-row console lines of a photo run (a failure, a photo without faces) and the progress bar."""
    from tqdm import tqdm

    def show(row: dict) -> None:
        bar.update(1)
        if row["error"] is not None:
            report_error(row["error"])
        elif not row["faces"]:
            tqdm.write(f"{row['input']}: no face found; written unchanged", file=sys.stderr)

    return show


def write_report(path: str | Path, entries: list[dict]) -> bool:
    """Write ``{"images": entries}`` as JSON to ``path`` atomically; on failure report it and return False."""
    from ..utils.io import write_text_atomic

    try:
        write_text_atomic(Path(path).expanduser(), json.dumps({"images": entries}, indent=2) + "\n")
    except OSError as e:
        report_error(f"{path}: cannot write the report: {e}")
        return False
    return True


def restore_photos(pipe, jobs: list[tuple[Path, Path]], args: argparse.Namespace,
                   report: list[dict] | None = None, face_models: dict | None = None, on_row=None) -> int:
    """Restore whole photos (and videos) ``jobs = [(input, output)]``; returns the number that failed.

    Photos run on :func:`osdface.batch.local.restore_collection` (file work overlapping the model,
    ``--prefetch``), then videos one by one. ``report``, if given, receives one
    ``{"input", "output", "faces"}`` entry per job (photos first, then videos), the format of
    ``--report FILE.json``; ``on_row`` gets each row with its ``"error"`` as soon as it is written.

    Raises:
        OSDFaceError: the detector, parsing model or background upsampler cannot be built (set-up error).
    """
    from tqdm import tqdm

    from ..batch.local import restore_collection
    from ..batch.stages import PhotoJob, WriteOptions

    restorer = build_restorer(pipe, args, face_models)  # set-up errors: OSDFaceErrors, one line, exit 2
    photos = [PhotoJob(s, d) for s, d in jobs if s.suffix.lower() not in VIDEO_EXTENSIONS]
    videos = [(s, d) for s, d in jobs if s.suffix.lower() in VIDEO_EXTENSIONS]
    failed = 0

    def emit(row: dict) -> None:
        if report is not None:
            report.append({k: row[k] for k in ("input", "output", "faces")})
        if on_row is not None:
            on_row(row)

    if photos:
        bar = tqdm(total=len(photos), desc="restore", unit="photo", disable=None)
        show = row_printer(bar)

        def photo_row(row: dict) -> None:
            emit(row)
            show(row)

        options = WriteOptions(compare=getattr(args, "compare", False), save_faces=getattr(args, "save_faces", False))
        stats = restore_collection(restorer, photos, photo_row, options, prefetch=getattr(args, "prefetch", 8))
        bar.close()
        failed += stats.failed

    for src, dst in videos:
        vdst = dst.with_suffix(".mp4")
        try:
            from ..face.video import probe_video, restore_video

            total = probe_video(src).frames or None
            with tqdm(total=total, desc=src.name, unit="frame", disable=None) as vbar:
                vr = restore_video(restorer, src, vdst, smooth=getattr(args, "smooth", True),
                                   progress=lambda n: vbar.update(1))
        except (ValueError, RuntimeError, OSError) as e:
            msg = f"{src}: video restoration failed: {e}"
            report_error(msg)
            emit({"input": str(src), "output": None, "faces": [], "error": msg})
            failed += 1
            continue
        faces = [{**d.to_json(), "frame": i} for i, dets in enumerate(vr.faces_per_frame) for d in dets]
        error = None
        if vr.failed_frames:
            error = f"{src}: {vr.failed_frames} of {vr.frames} frames could not be restored (written as is)"
            report_error(error)
            failed += 1
        emit({"input": str(src), "output": str(vdst), "faces": faces, "error": error})

    return failed
