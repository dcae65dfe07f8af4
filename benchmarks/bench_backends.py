"""Compare the inference backends on this machine: torch eager, ONNX Runtime (CPU EP), OpenVINO (CPU).

One 512×512 face (a square crop of ``tests/assets/face/kodim04.jpg`` resized to 512) through the real
SD 2.1-base / OSDFace sizes with random weights (nothing downloaded). The model folder and its fp32
ONNX export (``osdface.export.onnx``; the ~3.4 GB UNet as external data) are built once and cached in
``--model-dir`` / ``--onnx-dir``.

Each backend runs in a worker process of its own (clean peak RSS, its own load time); the parent
sends "restore one face" to the workers in turn — torch, onnxruntime, openvino, torch, ... — so a
change in the machine's speed during the run affects all backends alike. Per backend: load seconds,
seconds per stage (prompt encoder = VRE + adapter, VAE encode, UNet, x0, VAE decode) and per face
(first call separately, then the best of ``--repeats``), peak RSS, speed-up over torch eager, and the
max/mean output difference in 8-bit levels against torch.

Then one end-to-end measurement per backend as a fresh process (imports, load, first call):
``osdface restore face.png -o OUT --aligned --model DIR [--backend ...]``, and the plain-diffusers
reference script :data:`PLAIN_SCRIPT` doing the same math (diffusers VAE/UNet, our VRE + adapter).

    .venv/bin/python benchmarks/bench_backends.py --repeats 2 --out benchmarks/results/backends-cpu.json

No timed assertions: the figures go to the JSON (and, by hand, docs/performance.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

FACE_ASSET = ROOT / "tests" / "assets" / "face" / "kodim04.jpg"
ALL_BACKENDS = ("torch", "onnxruntime", "openvino")
#: OpenVINO on the IR folders of ``osdface export-openvino`` (float weights / --int8-weights); opt-in
IR_BACKENDS = ("openvino-ir", "openvino-int8")
STAGES = ("preprocess", "prompt_encoder", "vae_encode", "unet", "x0", "vae_decode", "postprocess")

# The reference: the same math with plain diffusers calls (no osdface pipeline, plan or lean decode).
# argv: model folder, input png, output png.
PLAIN_SCRIPT = r'''
import sys, json, torch, numpy as np
from pathlib import Path
from PIL import Image
from diffusers import AutoencoderKL, UNet2DConditionModel, DDIMScheduler
from osdface.models.prompt_encoder import PromptAdapter, VisualPromptEncoder
model, src, dst = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
t = json.loads((model / "model_index.json").read_text())["timestep"]
vae = AutoencoderKL.from_pretrained(model / "vae").eval()
unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
vre = VisualPromptEncoder.from_pretrained(model / "vre").eval()
adapter = PromptAdapter.from_pretrained(model / "prompt_adapter").eval()
alpha = torch.as_tensor(DDIMScheduler.from_pretrained(model / "scheduler").alphas_cumprod)[t].double()
x = torch.from_numpy(np.asarray(Image.open(src).convert("RGB"))).permute(2, 0, 1)[None].float() / 255 * 2 - 1
with torch.inference_mode():
    z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    prompt = adapter(vre(x))
    eps = unet(z, t, encoder_hidden_states=prompt).sample
    x0 = ((z.double() - (1 - alpha) ** 0.5 * eps.double()) / alpha ** 0.5).float()
    img = vae.decode(x0 / vae.config.scaling_factor).sample
out = ((img.clamp(-1, 1) + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
Image.fromarray(out).save(dst)
'''


# ------------------------------------------------------------------------------------ workers
def _worker_load(backend: str, args) -> object:
    if backend == "torch":
        from osdface.pipelines import OSDFacePipeline
        return OSDFacePipeline.from_pretrained(args.model_dir, torch_dtype="fp32", device="cpu")
    if backend == "onnxruntime":
        import onnxruntime as ort

        from osdface.runtime.onnx_runner import OnnxRuntimePipeline
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = args.threads
        return OnnxRuntimePipeline.from_folder(args.onnx_dir, providers=["CPUExecutionProvider"], session_options=so)
    if backend == "openvino":
        from osdface.runtime import openvino_runner as ovr
        config = dict(ovr.default_config("float32", "CPU")) if hasattr(ovr, "default_config") else {}
        config["INFERENCE_NUM_THREADS"] = args.threads
        return ovr.OpenVinoPipeline.from_folder(args.onnx_dir, device="CPU", config=config)
    if backend in IR_BACKENDS:
        from osdface.runtime import openvino_runner as ovr
        config = {**ovr.default_config("float32", "CPU"), "INFERENCE_NUM_THREADS": args.threads}
        return ovr.OpenVinoPipeline.from_folder(model_folder(backend, args), device="CPU", config=config)
    raise ValueError(backend)


def model_folder(backend: str, args) -> Path:
    """The folder a backend runs: the model folder (torch), the ONNX export, or one of its IR conversions."""
    return {"torch": args.model_dir, "openvino-ir": args.ir_dir, "openvino-int8": args.int8_dir}.get(backend,
                                                                                                     args.onnx_dir)


def _stages_torch(pipe, x, t, timed):
    """As ``OSDFacePipeline.restore_tensor`` on CPU (the same stage helpers and plan: heap trimming, lean decode)."""
    from osdface.image import to_uint8
    dev = pipe.device
    with timed(t, "preprocess", dev):
        lq = pipe.preprocess(x)
    with timed(t, "prompt_encoder", dev):
        prompt = pipe.encode_prompt(lq)
    with timed(t, "vae_encode", dev):
        z = pipe.encode_latent(lq)
        pipe.plan.between_stages(z)
    with timed(t, "unet", dev):
        eps = pipe.unet(z, pipe.timestep, encoder_hidden_states=prompt.to(z.dtype)).sample
    with timed(t, "x0", dev):
        x0 = pipe.predict_x0(z, eps)
    with timed(t, "vae_decode", dev):
        out = pipe._decode(x0, check_finite=True)
    with timed(t, "postprocess", dev):
        return to_uint8(out.float())


def _stages_onnx(pipe, x, t, timed):
    """As ``OnnxRuntimePipeline.restore_tensor`` (batch 1), each graph timed."""
    from osdface.image import from_model_range, to_uint8
    dev = pipe.device
    with timed(t, "preprocess", dev):
        lq = pipe.preprocess(x)
    with timed(t, "vae_encode", dev):
        (z,) = pipe._run("vae_encoder", image=lq)
    with timed(t, "prompt_encoder", dev):
        prompt, _ = pipe._run("prompt_encoder", image=lq)
    with timed(t, "unet", dev):
        (eps,) = pipe._run("unet", latent=z, prompt=prompt.to(z.dtype))
    with timed(t, "x0", dev):
        x0 = pipe.predict_x0(z, eps)
        pipe.check_finite(x0, "predicted latent")
    with timed(t, "vae_decode", dev):
        (img,) = pipe._run("vae_decoder", latent=x0.to(pipe.dtype))
        pipe.check_finite(img, "VAE decoder output")
    with timed(t, "postprocess", dev):
        return to_uint8(from_model_range(img.clamp(-1, 1)).clamp(0.0, 1.0).float())


def worker(args) -> None:
    """One backend in this process: load, then answer "run <npy>" / "quit" lines on stdin with JSON lines."""
    t_start = time.perf_counter()
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the JSON lines; anything libraries print goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import numpy as np
    import torch
    from _common import RSSSampler, peak_rss_gb, rss_gb, timed

    from osdface.image import to_uint8  # noqa: F401  (import cost outside the load time)

    torch.set_num_threads(args.threads)
    backend = args.worker
    import_s = time.perf_counter() - t_start
    rss0 = rss_gb()
    t0 = time.perf_counter()
    with RSSSampler() as load_rss:
        pipe = _worker_load(backend, args)
    load = {"import_seconds": round(import_s, 2), "load_seconds": round(time.perf_counter() - t0, 2),
            "rss_before_load_gb": round(rss0, 3), "load_peak_rss_gb": round(load_rss.peak, 3),
            "rss_after_load_gb": round(rss_gb(), 3), "repr": repr(pipe)[:300]}
    print(json.dumps(load), file=proto, flush=True)
    x = torch.from_numpy(np.load(args.face)).permute(2, 0, 1)[None].float().div(255)  # (1, 3, 512, 512)
    # the exported runners (ONNX Runtime, OpenVINO) share ``_run(graph, **inputs)``; time their graphs one by one
    staged = _stages_torch if backend == "torch" else _stages_onnx if hasattr(pipe, "_run") else None
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        t: dict = {}
        ru0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        with RSSSampler() as run_rss, torch.inference_mode():
            if staged is not None:
                out = staged(pipe, x, t, timed)
            else:  # a runner whose internals this script does not know: the whole call only
                t0 = time.perf_counter()
                out = pipe(x, output_type="uint8").images
                t["call"] = time.perf_counter() - t0
        wall, ru = time.perf_counter() - w0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru.ru_utime - ru0.ru_utime + ru.ru_stime - ru0.ru_stime
        np.save(cmd[1], np.asarray(out)[0])
        t = {k: round(v, 4) for k, v in t.items()}
        # CPU seconds this process got / (wall × threads): well below 1 = the cores were shared with other work
        print(json.dumps({"seconds": t, "seconds_per_face": round(sum(t.values()), 3), "cpu_seconds": round(cpu, 2),
                          "cpu_share": round(cpu / (wall * args.threads), 3),
                          "peak_rss_gb": round(run_rss.peak, 3)}), file=proto, flush=True)
    print(json.dumps({"process_peak_rss_gb": round(peak_rss_gb(), 3)}), file=proto, flush=True)


class Worker:
    def __init__(self, backend: str, args, face_npy: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", backend, "--model-dir", str(args.model_dir),
               "--onnx-dir", str(args.onnx_dir), "--ir-dir", str(args.ir_dir), "--int8-dir", str(args.int8_dir),
               "--threads", str(args.threads), "--face", str(face_npy)]
        self.backend = backend
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.load = None

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.backend} worker ended (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, npy: Path) -> dict:
        self.proc.stdin.write(f"run {npy}\n")
        self.proc.stdin.flush()
        return self.read()

    def quit(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self.read()
        self.proc.wait()
        return out


# ------------------------------------------------------------------------------------ helpers
def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def make_face(path_png: Path, path_npy: Path) -> dict:
    """The centred square crop of kodim04 (the face) resized to 512², as PNG (for the CLI) and .npy (HWC uint8)."""
    import numpy as np
    from PIL import Image
    im = Image.open(FACE_ASSET).convert("RGB")
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    face = im.crop(box).resize((512, 512), Image.BICUBIC)
    face.save(path_png)
    np.save(path_npy, np.asarray(face))
    return {"source": str(FACE_ASSET.relative_to(ROOT)), "crop_box": list(box), "size": [512, 512]}


def export_in_child(model_dir: Path, onnx_dir: Path) -> float | None:
    """The fp32 ONNX export of ``model_dir`` into ``onnx_dir`` (in a child process), unless it is there."""
    if (onnx_dir / "manifest.json").is_file():
        return None
    code = ("from osdface.pipelines import OSDFacePipeline\nfrom osdface.export.onnx import export_onnx\n"
            f"export_onnx(OSDFacePipeline.from_pretrained({str(model_dir)!r}, torch_dtype='fp32', device='cpu'), "
            f"{str(onnx_dir)!r})\n")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return round(time.perf_counter() - t0, 1)


def convert_in_child(onnx_dir: Path, ir_dir: Path, int8: bool) -> dict | None:
    """``osdface export-openvino`` of ``onnx_dir`` into ``ir_dir`` (a timed child process), unless it is there."""
    if (ir_dir / "manifest.json").is_file():
        return None
    cmd = [sys.executable, "-m", "osdface", "export-openvino", str(onnx_dir), "-o", str(ir_dir)]
    r = timed_process(cmd + (["--int8-weights"] if int8 else []))
    if r["exit"]:
        raise RuntimeError(f"export-openvino failed: {r.get('stderr_tail')}")
    return r


def timed_process(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, exit status and peak RSS (this child alone, via wait4) of a fresh process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err_reader = p.stderr
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    tail = err_reader.read().decode(errors="replace")[-400:]
    p.returncode = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime
    out = {"wall_seconds": round(wall, 2), "exit": p.returncode, "peak_rss_gb": round(ru.ru_maxrss * 1024 / 1e9, 3),
           "cpu_seconds": round(cpu, 2), "cpu_share": round(cpu / (wall * (os.cpu_count() or 1)), 3)}
    if p.returncode:
        out["stderr_tail"] = tail
    return out


def diff_levels(a, b) -> dict:
    import numpy as np
    if a.shape != b.shape:
        return {"shapes_differ": [list(a.shape), list(b.shape)]}
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(d.max()), "mean": round(float(d.mean()), 4), "fraction_differing": round(float((d > 0).mean()), 4)}


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()
    return {"head": git("rev-parse", "--short", "HEAD"), "head_subject": git("log", "-1", "--format=%s")[:120],
            "uncommitted": git("status", "--porcelain").splitlines()}


def openvino_available() -> str | None:
    """None when the OpenVINO runner can run here, else why not."""
    import importlib.util
    if importlib.util.find_spec("osdface.runtime.openvino_runner") is None:
        return "osdface.runtime.openvino_runner does not exist yet"
    if importlib.util.find_spec("openvino") is None:
        return "the openvino package is not installed"
    return None


# --------------------------------------------------------------------------------------- main
def main() -> None:
    tmp = Path(tempfile.gettempdir())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=tmp / "osdface-bench-sd21-random")
    ap.add_argument("--onnx-dir", type=Path, default=tmp / "osdface-bench-sd21-random-onnx")
    ap.add_argument("--ir-dir", type=Path, default=tmp / "osdface-bench-sd21-random-ir")
    ap.add_argument("--int8-dir", type=Path, default=tmp / "osdface-bench-sd21-random-int8")
    ap.add_argument("--repeats", type=int, default=3, help="timed faces per backend after the first call")
    ap.add_argument("--backends", default=",".join(ALL_BACKENDS),
                    help=f"comma-separated, of {', '.join(ALL_BACKENDS + IR_BACKENDS)}")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every backend")
    ap.add_argument("--cli-repeats", type=int, default=1,
                    help="end-to-end fresh-process runs per command (alternating); 0 skips them")
    ap.add_argument("--cli-faces", type=int, default=0, metavar="N",
                    help="also time each backend's CLI on a folder of N crops (0: only the single face)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "backends-cpu.json")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. other load on the machine)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--face", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import numpy as np
    from _common import build_random_model_folder, machine
    from PIL import Image

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    result: dict = {"benchmark": "backends", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": machine(), "threads": args.threads, "note": args.note, "loadavg_before": loadavg()}
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    skipped = {}
    if "openvino" in backends and (why := openvino_available()):
        skipped["openvino"] = why
        backends.remove("openvino")
    result["skipped"] = skipped
    result["git"] = git_state()
    t0 = time.perf_counter()
    build_random_model_folder(args.model_dir)
    result["model_build_seconds"] = round(time.perf_counter() - t0, 1)
    if any(b != "torch" for b in backends):
        result["onnx_export_seconds"] = export_in_child(args.model_dir, args.onnx_dir)  # None: cached
        result["onnx_folder_gb"] = round(sum(f.stat().st_size for f in args.onnx_dir.iterdir()) / 1e9, 3)
    for b in (b for b in backends if b in IR_BACKENDS):  # the IR conversions (timed, peak RSS), unless cached
        folder = model_folder(b, args)
        result[f"{b}_conversion"] = convert_in_child(args.onnx_dir, folder, int8=b == "openvino-int8")
        result[f"{b}_folder_gb"] = round(sum(f.stat().st_size for f in folder.iterdir()) / 1e9, 3)
    result["model_folder_gb"] = round(sum(f.stat().st_size for f in args.model_dir.rglob("*.safetensors")) / 1e9, 3)
    try:
        import onnxruntime
        result["machine"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass

    work = Path(tempfile.mkdtemp(prefix="osdface-bench-backends-"))
    face_png, face_npy = work / "face.png", work / "face.npy"
    result["input"] = make_face(face_png, face_npy)

    # ---- per-stage, alternating: load every worker, then face k of every backend in turn
    workers = {}
    for b in backends:  # loaded one after the other (each load timed alone)
        w = Worker(b, args, face_npy)
        w.load = w.read()
        workers[b] = w
        print(f"[bench_backends] {b} loaded: {w.load}", file=sys.stderr, flush=True)
    runs: dict[str, list] = {b: [] for b in backends}
    outputs: dict[str, np.ndarray] = {}
    for k in range(args.repeats + 1):  # k = 0: the first call (pages weights in, allocator warm-up)
        order = backends if k % 2 == 0 else backends[::-1]  # alternate which one goes first
        for b in order:
            npy = work / f"{b}-{k}.npy"
            r = workers[b].run(npy)
            r["loadavg_after"] = loadavg()
            runs[b].append(r)
            outputs[b] = np.load(npy)
            print(f"[bench_backends] {b} face {k}: {r['seconds_per_face']} s", file=sys.stderr, flush=True)
    per_backend = {}
    for b in backends:
        end = workers[b].quit()
        timed_runs = runs[b][1:] or runs[b]
        best = min(timed_runs, key=lambda r: r["seconds_per_face"])
        per_backend[b] = {"load": workers[b].load, "first_call": runs[b][0], "runs": runs[b][1:], "best": best,
                          "mean_seconds_per_face": round(sum(r["seconds_per_face"] for r in timed_runs) / len(timed_runs), 3),
                          **end}
    ref = per_backend.get("torch")
    for b, d in per_backend.items():
        if ref is not None:
            d["speedup_vs_torch_best"] = round(ref["best"]["seconds_per_face"] / d["best"]["seconds_per_face"], 3)
            d["output_diff_vs_torch_levels"] = diff_levels(outputs[b], outputs["torch"])
            # the same round's torch face ran right before or after this one: robust to the machine's drift
            d["speedup_vs_torch_per_round"] = [round(t["seconds_per_face"] / r["seconds_per_face"], 3)
                                               for t, r in zip(ref["runs"], d["runs"], strict=True)]
        d["outputs_repeatable"] = all(
            np.array_equal(np.load(work / f"{b}-0.npy"), np.load(work / f"{b}-{k}.npy")) for k in range(1, args.repeats + 1))
    result["backends"] = per_backend
    save(result, args.out, partial="end-to-end measurements not run yet")

    # ---- end to end, fresh processes: the CLI per backend and the plain-diffusers reference
    if args.cli_repeats > 0:
        cli = [sys.executable, "-m", "osdface"] if shutil.which("osdface") is None else ["osdface"]
        exe = Path(sys.executable).parent / "osdface"
        if exe.is_file():
            cli = [str(exe)]
        env = dict(os.environ)
        jobs = {}
        for b in backends:
            if b == "torch":
                jobs["cli_torch"] = cli + ["restore", str(face_png), "-o", str(work / "cli_torch"), "--aligned",
                                           "--model", str(args.model_dir)]
            else:
                jobs[f"cli_{b}"] = cli + ["restore", str(face_png), "-o", str(work / f"cli_{b}"), "--aligned",
                                          "--model", str(model_folder(b, args)), "--backend", b.split("-")[0]]
        if args.cli_faces > 0:  # a folder of N copies of the face: the load is shared by N restorations
            folder = work / "faces"
            folder.mkdir(exist_ok=True)
            for k in range(args.cli_faces):
                shutil.copy(face_png, folder / f"face{k}.png")
            for name in [n for n in jobs if n.startswith("cli_")]:
                jobs[f"{name}_{args.cli_faces}faces"] = [str(folder) if c == str(face_png) else
                                                         str(work / f"{name}_{args.cli_faces}faces") if
                                                         c == str(work / name) else c for c in jobs[name]]
        (work / "plain_diffusers.py").write_text(PLAIN_SCRIPT)
        jobs["plain_diffusers"] = [sys.executable, str(work / "plain_diffusers.py"), str(args.model_dir),
                                   str(face_png), str(work / "plain_diffusers.png")]
        e2e: dict = {}
        rounds = [list(jobs) if k % 2 == 0 else list(jobs)[::-1] for k in range(args.cli_repeats)]
        for name in (n for order in rounds for n in order):  # alternating, as the per-stage runs
            cmd = jobs[name]
            shutil.rmtree(work / name, ignore_errors=True)
            r = timed_process(cmd, env)
            if r["exit"] == 2 and "invalid choice" in r.get("stderr_tail", ""):
                r["not_run"] = "the CLI has no such --backend yet"
            r["command"] = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
            png = work / "plain_diffusers.png" if name == "plain_diffusers" else \
                work / name / ("face0.png" if name.endswith("faces") else "face.png")
            if png.is_file() and "torch" in outputs:
                r["output_diff_vs_torch_worker_levels"] = diff_levels(np.asarray(Image.open(png).convert("RGB")),
                                                                      outputs["torch"])
            r["loadavg_after"] = loadavg()
            e2e.setdefault(name, {"runs": []})["runs"].append(r)
            print(f"[bench_backends] {name}: {r['wall_seconds']} s", file=sys.stderr, flush=True)
        for d in e2e.values():
            ok = [r["wall_seconds"] for r in d["runs"] if r["exit"] == 0]
            d["best_wall_seconds"] = min(ok) if ok else None
        plain = e2e.get("plain_diffusers", {}).get("best_wall_seconds")
        for name, d in e2e.items():
            if plain and name != "plain_diffusers" and d["best_wall_seconds"]:
                d["speedup_vs_plain_diffusers_best"] = round(plain / d["best_wall_seconds"], 3)
                d["speedup_vs_plain_diffusers_per_round"] = [
                    round(p["wall_seconds"] / r["wall_seconds"], 3) if r["exit"] == 0 and p["exit"] == 0 else None
                    for r, p in zip(d["runs"], e2e["plain_diffusers"]["runs"], strict=True)]
        for name, d in e2e.items():  # the target: each exported runtime's CLI against the torch CLI
            parts = name.split("_", 2)  # cli, backend[, Nfaces]
            ref = e2e.get("_".join(["cli", "torch", *parts[2:]]))
            if parts[0] == "cli" and ref is not None and ref is not d:
                d["speedup_vs_cli_torch_per_round"] = [
                    round(t["wall_seconds"] / r["wall_seconds"], 3) if r["exit"] == 0 and t["exit"] == 0 else None
                    for r, t in zip(d["runs"], ref["runs"], strict=True)]
        result["end_to_end"] = e2e

    result["loadavg_after"] = loadavg()
    shutil.rmtree(work, ignore_errors=True)
    print(save(result, args.out))


def save(result: dict, out: Path | None, partial: str | None = None) -> str:
    """Write the JSON (with ``"partial": why`` while the run is unfinished); returns the text."""
    result = {**result, "partial": partial} if partial else {k: v for k, v in result.items() if k != "partial"}
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    return text


if __name__ == "__main__":
    main()
