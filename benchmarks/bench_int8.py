"""OpenVINO on the CPU with float32 weights vs int8 weights (``OpenVinoPipeline.from_folder(..., int8_weights=True)``,
``osdface restore --backend openvino --int8-weights``): speed, load, memory and output difference.

The same face, model folder and fp32 ONNX export as ``bench_backends.py`` (real SD 2.1-base / OSDFace sizes,
random weights), through its worker processes: first a torch worker restores the face once (the reference
output) and quits, so that its memory is not held during the rest; then an OpenVINO worker with float32
weights and one with int8 weights (compressed at load by nncf, data-free INT8_ASYM; UNet and VAE, the prompt
encoder stays float32) answer alternately — fp32, int8, int8, fp32, ... Per variant: load seconds (including
the compression), per-stage and per-face seconds (first call, then the best of ``--repeats``), peak RSS, and
the output difference in 8-bit levels against fp32 OpenVINO and against torch.

    .venv/bin/python benchmarks/bench_int8.py --repeats 2 --out benchmarks/results/openvino-int8-cpu.json

Random weights say little about the visual cost of int8 weights on the real model; the figures are speed,
memory and a pixel difference only.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_backends as bb  # noqa: E402

VARIANTS = ("openvino", "openvino-int8")


def main() -> None:
    tmp = Path(tempfile.gettempdir())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=tmp / "osdface-bench-sd21-random")
    ap.add_argument("--onnx-dir", type=Path, default=tmp / "osdface-bench-sd21-random-onnx")
    ap.add_argument("--repeats", type=int, default=2, help="timed faces per variant after the first call")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every worker")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "openvino-int8-cpu.json")
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    args = ap.parse_args()

    import importlib.metadata

    import numpy as np
    from _common import build_random_model_folder, machine

    machine_info = machine()
    for pkg in ("openvino", "nncf"):
        machine_info[pkg] = importlib.metadata.version(pkg)
    result: dict = {"benchmark": "openvino-int8", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "machine": machine_info, "threads": args.threads, "note": args.note,
        "loadavg_before": bb.loadavg(), "git": bb.git_state(),
        "caveat": "random weights: the pixel differences say nothing reliable about visual quality on the real model"}
    build_random_model_folder(args.model_dir)
    result["onnx_export_seconds"] = bb.export_in_child(args.model_dir, args.onnx_dir)  # None: cached
    work = Path(tempfile.mkdtemp(prefix="osdface-bench-int8-"))
    face_png, face_npy = work / "face.png", work / "face.npy"
    result["input"] = bb.make_face(face_png, face_npy)

    # the torch reference: one face, then the worker quits (its memory is not held during the OpenVINO runs)
    torch_worker = bb.Worker("torch", args, face_npy)
    torch_load = torch_worker.read()
    torch_run = torch_worker.run(work / "torch.npy")
    result["torch_reference"] = {"load": torch_load, "first_call": torch_run, **torch_worker.quit()}
    ref_torch = np.load(work / "torch.npy")
    print(f"[bench_int8] torch reference: {torch_run['seconds_per_face']} s", file=sys.stderr, flush=True)

    workers = {}
    for v in VARIANTS:
        w = bb.Worker(v, args, face_npy)
        w.load = w.read()
        workers[v] = w
        print(f"[bench_int8] {v} loaded: {w.load}", file=sys.stderr, flush=True)
    runs: dict[str, list] = {v: [] for v in VARIANTS}
    outputs = {}
    for k in range(args.repeats + 1):
        for v in VARIANTS if k % 2 == 0 else VARIANTS[::-1]:
            npy = work / f"{v}-{k}.npy"
            r = workers[v].run(npy)
            r["loadavg_after"] = bb.loadavg()
            runs[v].append(r)
            outputs[v] = np.load(npy)
            print(f"[bench_int8] {v} face {k}: {r['seconds_per_face']} s", file=sys.stderr, flush=True)
    per = {}
    for v in VARIANTS:
        end = workers[v].quit()
        timed = runs[v][1:] or runs[v]
        per[v] = {"load": workers[v].load, "first_call": runs[v][0], "runs": runs[v][1:],
                  "best": min(timed, key=lambda r: r["seconds_per_face"]), **end,
                  "output_diff_vs_torch_levels": bb.diff_levels(outputs[v], ref_torch),
                  "output_diff_vs_openvino_fp32_levels": bb.diff_levels(outputs[v], outputs["openvino"]),
                  "outputs_repeatable": all(np.array_equal(np.load(work / f"{v}-0.npy"), np.load(work / f"{v}-{k}.npy"))
                                            for k in range(1, args.repeats + 1))}
    fp, q = per["openvino"]["best"]["seconds_per_face"], per["openvino-int8"]["best"]["seconds_per_face"]
    per["openvino-int8"]["speedup_vs_openvino_fp32_best"] = round(fp / q, 3)
    per["openvino-int8"]["speedup_vs_openvino_fp32_per_round"] = [
        round(a["seconds_per_face"] / b["seconds_per_face"], 3)
        for a, b in zip(per["openvino"]["runs"], per["openvino-int8"]["runs"], strict=True)]
    result["variants"] = per
    result["loadavg_after"] = bb.loadavg()
    shutil.rmtree(work, ignore_errors=True)
    print(bb.save(result, args.out))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"[bench_int8] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
