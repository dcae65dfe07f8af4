"""Helpers shared by CLI subcommands: input expansion, output-path checks, model loading flags, errors."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..constants import IMAGE_EXTENSIONS
from ..errors import OSDFaceError, OutputPathError
from ..utils.io import clean_stale_temps


class CLIError(OSDFaceError):
    """A usage or set-up problem: printed without a traceback, exit code 2."""


def expand_inputs(inputs: list[str], extensions=IMAGE_EXTENSIONS) -> tuple[list[Path], list[str]]:
    """Files, folders (non-recursive, sorted) and globs → (existing files, problems).

    Folders skip hidden files and osdface temporaries; globs skip temporaries (a glob matches hidden
    names only when its pattern asks for them). A file named explicitly is taken as is, unless it is
    an osdface temporary (reported as a problem). The rules live in
    :func:`osdface.batch.inputs.collect_inputs` (``osdface restore`` scans folders recursively).
    """
    from ..batch.inputs import collect_inputs

    photos, problems = collect_inputs(inputs, extensions, recursive=False)
    return [ph.path for ph in photos], problems


# --- output paths -------------------------------------------------------------------------------------------


def check_name_part(option: str, value: str) -> str:
    """Refuse a user-given piece of a file name (``--suffix``, a method name) that could leave its folder.

    It may not contain a path separator, ``..`` or NUL, nor start with ``.`` (a hidden file, which
    input scanning would skip). Returns ``value``.

    Raises:
        OutputPathError: naming the option and the problem.
    """
    bad = None
    if "\0" in value:
        bad = "contains a NUL character"
    elif "/" in value or "\\" in value or os.sep in value or (os.altsep and os.altsep in value):
        bad = "contains a path separator"
    elif ".." in value:
        bad = "contains '..'"
    elif value.startswith("."):
        bad = "starts with '.' (a hidden file name)"
    if bad:
        raise OutputPathError(f"{option} {value!r} {bad}; it becomes part of a file name inside the output folder")
    return value


def written_entry(p: Path) -> Path:
    """The directory entry a write to ``p`` replaces: the parent resolved, the last name kept.

    osdface writes atomically (a temporary renamed onto the name), so a symlink at ``p`` itself is
    replaced, not followed.
    """
    return p.parent.resolve() / p.name


def _keys(p: Path) -> set[Path]:
    return {written_entry(p), p.resolve()}


def _inode(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output_dir(option: str, path: str | os.PathLike) -> Path:
    """Check that ``path`` can be an output folder (a folder, or creatable as one); returns it expanded.

    Raises:
        OutputPathError: ``path`` is an existing file, or one of its parents is.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{p}: {option} names an existing file, not a folder")
    _check_parents(option, p)
    return p


def _check_parents(option: str, p: Path) -> None:
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{p}: {option}: {parent} is a file, not a folder")
            return


def check_output_files(
    named: Sequence[tuple[str, str | os.PathLike]],
    *,
    inputs: Iterable[Path] = (),
    planned: Iterable[Path] = (),
    planned_patterns: Iterable[tuple[Path, re.Pattern]] = (),
    out_dirs: Iterable[Path] = (),
    overwrite: bool = False,
) -> list[Path]:
    """Validate every output file the user named (a report, a manifest) before any work starts.

    Args:
        named: ``(label, path)`` pairs; ``label`` is the option as the user knows it (``"--report"``),
            or says which option a file derives from (``"the .md file beside --out"``).
        inputs: every input file of the run (compared by resolved path and by inode, so hard links
            and symlinks count).
        planned: the other files this run will write (image outputs, side outputs).
        planned_patterns: ``(folder, name regex)`` for outputs whose exact names are not known yet
            (face crops ``<stem>_NN.png``).
        out_dirs: folders this run writes into; a named file may not be one of them or above one.
        overwrite: an existing file may be replaced (``--overwrite``); otherwise it is an error.

    Returns:
        The named paths, expanded (``~``), in order.

    Raises:
        OutputPathError: a named path is a folder, an input, another output of the run, named twice,
            under a file, or exists without ``overwrite``. The message names the path.
    """
    input_keys: dict[Path, Path] = {}
    input_inodes: dict[tuple[int, int], Path] = {}
    for f in inputs:
        for k in _keys(f):
            input_keys.setdefault(k, f)
        ino = _inode(f)
        if ino is not None:
            input_inodes.setdefault(ino, f)
    planned_keys = {written_entry(o): o for o in planned}
    patterns = [(folder.resolve(), rx) for folder, rx in planned_patterns]
    dirs = [written_entry(d) for d in out_dirs]
    seen: dict[Path, str] = {}
    result = []
    for label, raw in named:
        text = os.fspath(raw)
        if not text or "\0" in text:
            raise OutputPathError(f"{label}: {text!r} is not a usable file name")
        p = Path(text).expanduser()
        if text.endswith(("/", os.sep)) or p.is_dir():
            raise OutputPathError(f"{p} is a folder; {label} needs a file name")
        _check_parents(label, p)
        keys = _keys(p)
        hit = next((input_keys[k] for k in keys if k in input_keys), None)
        ino = _inode(p)
        if hit is None and ino is not None:
            hit = input_inodes.get(ino)
        if hit is not None:
            same = "" if written_entry(hit) == written_entry(p) else f" (the same file as {hit})"
            raise OutputPathError(f"{p} is an input file of this run{same}; choose another path for {label}")
        out = next((planned_keys[k] for k in keys if k in planned_keys), None)
        entry = written_entry(p)
        if out is None and any(entry.parent == folder and rx.fullmatch(entry.name) for folder, rx in patterns):
            out = entry
        if out is not None:
            raise OutputPathError(f"{p} is also an output this run writes; choose another path for {label}")
        for d in dirs:
            if entry == d or entry in d.parents:
                raise OutputPathError(f"{p} is the output folder {d} (or above it); choose another path for {label}")
        if entry in seen:
            raise OutputPathError(f"{p} would be written twice ({seen[entry]} and {label}); choose another path")
        seen[entry] = label
        if p.exists() and not overwrite:
            extra = "" if label.startswith("-") else f" ({label})"
            raise OutputPathError(f"{p} exists; pass --overwrite to replace it{extra}")
        result.append(p)
    return result


def image_outputs_inside(out_dir: Path, outputs: Iterable[Path]) -> None:
    """Refuse any output that would land outside ``out_dir`` (resolved), e.g. through a crafted name."""
    root = out_dir.resolve()
    for o in outputs:
        if written_entry(o).parent != root and root not in written_entry(o).parents:
            raise OutputPathError(f"{o}: output would be written outside the output folder {out_dir}")


def clean_output_dirs(*folders: Path) -> None:
    """Remove temporaries that killed runs left in the folders this run writes into."""
    for folder in folders:
        clean_stale_temps(folder)


def add_overwrite_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: allow replacing the existing ``what`` file(s) the user named (refused otherwise)."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists (refused otherwise)")


#: --backend values: torch runs the model folder in PyTorch; the others run an ONNX export folder; auto
#: picks by the folder and the device (:func:`resolve_backend`)
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (default: $OSDFACE_HOME/model, else $OSDFACE_HOME/{stable-diffusion-2-1-base,OSDFace})")
    g.add_argument("--model", metavar="MODEL_DIR", help="a converted osdface model folder")
    g.add_argument("--base-model", metavar="SD_DIR", help="Stable Diffusion 2.1-base diffusers folder")
    g.add_argument("--weights", metavar="OSDFACE_DIR", help="folder with the official OSDFace release files")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="run precision (default: fp16 on CUDA, fp32 elsewhere)")
    g.add_argument("--no-fuse-lora", dest="fuse_lora", action="store_false",
                   help="keep the LoRA unmerged (peft) instead of merging it into the UNet")
    g.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="auto (default): torch for a model folder; for a folder written by osdface export-onnx, "
                   "openvino on the CPU (the fastest here, docs/performance.md) or onnxruntime when openvino is not "
                   "installed, onnxruntime on CUDA. onnxruntime/openvino: --latent mode only, precision fixed at "
                   "export; --device: onnxruntime auto|cpu|cuda, openvino auto|cpu|gpu[.N]|npu")


def resolve_backend(args) -> str:
    """The engine ``--backend`` names; for ``auto``, the one the measurements favour for ``--model``/``--device``.

    A folder written by ``osdface export-onnx`` (it has the ONNX manifest) runs on the CPU with OpenVINO,
    1.0-1.2x faster per face than ONNX Runtime and 1.6-1.9x faster than torch on the dev machine
    (docs/performance.md, "Backends on this CPU"), falling back to ONNX Runtime when the ``openvino``
    package is missing; on CUDA with ONNX Runtime (CUDA/TensorRT providers); on an OpenVINO device
    (``gpu``, ``gpu.N``, ``npu``) with OpenVINO. Every other model source runs in torch.
    """
    backend = getattr(args, "backend", "torch")
    if backend != "auto":
        return backend
    from ..io.onnx_format import is_exported_folder

    if not is_exported_folder(getattr(args, "model", None)):
        return "torch"
    device = str(getattr(args, "device", "auto")).lower()
    if device.startswith("cuda"):
        return "onnxruntime"
    if device in ("auto", "cpu") and importlib.util.find_spec("openvino") is None:
        return "onnxruntime"
    return "openvino"


def load_pipeline_from_args(args):
    """Build the pipeline from --model / --base-model+--weights / the default locations."""
    from ..io.names import MODEL_INDEX
    from ..io.onnx_format import is_exported_folder
    from ..pipelines.pipeline_osdface import OSDFacePipeline, resolve_device
    from ..weights import (
        OFFICIAL_FILES,
        OFFICIAL_WEIGHTS_HELP,
        WeightsNotFoundError,
        default_base_model_dir,
        default_model_dir,
        default_official_dir,
        osdface_home,
    )

    if resolve_backend(args) != "torch":
        return load_exported_runner_from_args(args)
    if is_exported_folder(args.model):
        raise CLIError(f"--model {args.model}: an ONNX export (osdface export-onnx), not a torch model folder; "
                       "run it with --backend auto, openvino or onnxruntime")
    device = resolve_device(args.device)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "fp16" if device.type == "cuda" else "fp32"
    if args.model and (args.base_model or args.weights):
        raise CLIError("give either --model or --base-model/--weights, not both")
    if bool(args.base_model) != bool(args.weights):
        raise CLIError("--base-model and --weights go together (the SD 2.1-base folder and the OSDFace files)")
    try:
        if args.model:
            return OSDFacePipeline.from_pretrained(args.model, torch_dtype=dtype, device=device, fuse_lora=args.fuse_lora)
        if args.base_model:
            return OSDFacePipeline.from_official(args.base_model, args.weights, torch_dtype=dtype, device=device,
                                                 fuse_lora=args.fuse_lora)
        if (default_model_dir() / MODEL_INDEX).is_file():
            return OSDFacePipeline.from_pretrained(default_model_dir(), torch_dtype=dtype, device=device,
                                                   fuse_lora=args.fuse_lora)
        return OSDFacePipeline.from_official(default_base_model_dir(), default_official_dir(), torch_dtype=dtype,
                                             device=device, fuse_lora=args.fuse_lora)
    except WeightsNotFoundError as e:
        if args.model or args.base_model:
            raise CLIError(str(e)) from None
        home = osdface_home()
        raise CLIError(
            "No OSDFace weights found. Either\n"
            f"  (a) put the official files in {default_official_dir()}/ ({', '.join(OFFICIAL_FILES)})\n"
            f"      and the diffusers SD 2.1-base folder in {default_base_model_dir()}/ (scheduler/, unet/, vae/),\n"
            f"  (b) or pass --base-model SD_DIR --weights OSDFACE_DIR, or --model MODEL_DIR.\n"
            f"Set OSDFACE_HOME to use another folder than {home}.\n"
            f"{OFFICIAL_WEIGHTS_HELP}"
        ) from e


def load_exported_runner_from_args(args):
    """``--backend onnxruntime|openvino``: the runner of the ONNX folder ``--model``
    (:class:`~osdface.runtime.onnx_runner.OnnxRuntimePipeline` or
    :class:`~osdface.runtime.openvino_runner.OpenVinoPipeline`), for aligned crops, whole photos and
    videos alike. The refusals (no ONNX folder, ``--latent sample``, a ``--dtype`` other than the
    export's) are the same for both engines; ``--device`` picks the engine's device."""
    backend = resolve_backend(args)
    if backend not in BACKENDS[2:]:
        raise CLIError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if not args.model or args.base_model or args.weights:
        raise CLIError(f"--backend {backend} needs --model ONNX_DIR (a folder written by osdface export-onnx) "
                       "and no --base-model/--weights")
    if getattr(args, "latent", "mode") != "mode":
        raise CLIError(f"--backend {backend} encodes the posterior mode only: drop --latent sample")
    if not getattr(args, "fuse_lora", True):
        raise CLIError(f"--backend {backend}: the export has the LoRA merged; drop --no-fuse-lora")
    device = str(args.device)
    if backend == "onnxruntime":
        runner = _onnxruntime_runner(args.model, device)
    else:
        runner = _openvino_runner(args.model, device)
    wanted = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(args.dtype)
    if wanted is not None and wanted != runner.manifest["dtype"]:
        raise CLIError(f"--dtype {args.dtype}: {args.model} was exported in {runner.manifest['dtype']} "
                       "(the precision is fixed at export; drop --dtype or export again)")
    return runner


def _onnxruntime_runner(model: str, device: str):
    from ..errors import DeviceError
    from ..runtime.onnx_runner import OnnxRuntimePipeline, default_providers

    providers = default_providers()
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device.startswith("cuda"):
        if "CUDAExecutionProvider" not in providers:
            raise DeviceError("device 'cuda' requested but this onnxruntime has no CUDA execution provider "
                              "(install onnxruntime-gpu)")
        providers = [p for p in providers if p != "TensorrtExecutionProvider"]
    elif device != "auto":
        raise CLIError(f"--device {device}: --backend onnxruntime runs on auto, cpu or cuda")
    return OnnxRuntimePipeline.from_folder(model, providers=providers)


def _openvino_runner(model: str, device: str):
    from ..runtime.openvino_runner import OpenVinoPipeline

    if device in ("auto", "cpu"):
        ov_device = "CPU"  # AUTO could pick an Intel GPU and its float16 default; the CPU is predictable
    elif re.fullmatch(r"(gpu(\.\d+)?|npu)", device, flags=re.IGNORECASE):
        ov_device = device.upper()
    else:
        raise CLIError(f"--device {device}: --backend openvino runs on auto, cpu, gpu, gpu.N (Intel GPUs) or npu")
    return OpenVinoPipeline.from_folder(model, device=ov_device)


def report_error(message: str) -> None:
    print(f"osdface: error: {message}", file=sys.stderr)
