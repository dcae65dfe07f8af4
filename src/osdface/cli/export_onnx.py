"""``osdface export-onnx``: a model folder → four ONNX graphs + ``manifest.json`` (:mod:`osdface.export.onnx`)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-onnx", help="export a model folder to ONNX graphs for ONNX Runtime",
        description="Export a model folder (LoRA merged) to vae_encoder.onnx, prompt_encoder.onnx, unet.onnx and "
        "vae_decoder.onnx plus manifest.json (shapes, dtypes, timestep, alpha_cumprod, sha256 of every file). The "
        "x0 step stays in host code (float64). Needs the onnx extra: pip install 'osdface[onnx]'.")
    p.add_argument("model", metavar="MODEL_DIR", help="model folder (written by osdface convert or export)")
    p.add_argument("-o", "--output", metavar="ONNX_DIR", required=True,
                   help="folder to write (must not exist or be empty; written atomically)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--fp16", action="store_true", help="export float16 graphs (default float32)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="symbolic batch axis on every graph (default: one image per call)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..export.onnx import DEFAULT_OPSET, export_onnx
    from ..pipelines.pipeline_osdface import OSDFacePipeline
    from .convert import check_new_model_dir

    out = check_new_model_dir(args.output)
    # a missing or malformed model folder raises an OSDFaceError: one line, exit 2 (osdface.cli.main)
    pipe = OSDFacePipeline.from_pretrained(args.model, torch_dtype="fp16" if args.fp16 else "fp32", device="cpu")
    manifest = export_onnx(pipe, out, opset=args.opset if args.opset is not None else DEFAULT_OPSET,
                           dynamic_batch=args.dynamic_batch)
    for g in manifest["graphs"].values():
        print(f"wrote {out / g['file']}")
    print(f"wrote {out / 'manifest.json'}")
    return 0
