"""``osdface export-openvino``: an ONNX export → OpenVINO IR, optionally with int8 weights
(:mod:`osdface.export.openvino`)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-openvino", help="convert an ONNX export to OpenVINO IR (optionally int8 weights)",
        description="Convert a folder written by osdface export-onnx to OpenVINO IR (<graph>.xml + .bin and "
        "manifest.json), run with restore --backend openvino (or auto). --int8-weights compresses the VAE and "
        "UNet weights to int8 (NNCF, data-free): a smaller folder at an accuracy cost measured in "
        "docs/performance.md. Needs the openvino extra: pip install 'osdface[openvino]'.")
    p.add_argument("onnx_dir", metavar="ONNX_DIR", help="folder written by osdface export-onnx")
    p.add_argument("-o", "--output", metavar="IR_DIR", required=True,
                   help="folder to write (must not exist or be empty; written atomically)")
    p.add_argument("--int8-weights", action="store_true",
                   help="int8 weights for the VAE and UNet (default: the export's float weights)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..export.openvino import export_openvino
    from .convert import check_new_model_dir

    out = check_new_model_dir(args.output)
    manifest = export_openvino(args.onnx_dir, out, int8_weights=args.int8_weights)
    for g in manifest["graphs"].values():
        print(f"wrote {out / g['file']} (+ {g['external_data']['file']})")
    print(f"wrote {out / 'manifest.json'}")
    return 0
