"""Time one-step restoration of 512×512 faces with the real SD 2.1-base architecture (random weights).

Prints JSON: load time and RSS, seconds per stage (VRE + adapter, VAE encode, UNet, x0, VAE decode,
pre/post-processing) per batch size, faces/second, peak memory, and the FLOP count with the achieved
FLOP/s. No download: the model folder is built once from configs with random weights.

    .venv/bin/python benchmarks/bench_restore.py                      # CPU fp32, batch 1
    .venv/bin/python benchmarks/bench_restore.py --device cuda --dtype fp16 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    RSSSampler,
    build_random_model_folder,
    collect,
    emit,
    machine,
    peak_rss_gb,
    rss_gb,
    sync,
    timed,
)


def stage_times(pipe, x_uint8: torch.Tensor) -> dict:
    """One batch through the pipeline's stages, timed separately (same math and execution plan as
    ``pipe.__call__``: the stage helpers ``restore_tensor`` uses, with the plan's heap trimming)."""
    from osdface.image import to_uint8

    dev = pipe.device
    t: dict = {}
    with torch.inference_mode():
        with timed(t, "preprocess", dev):
            lq = pipe.preprocess(x_uint8.to(dev, non_blocking=True).float().div(255))
        if pipe.plan.resolve(dev).encoder_overlap:
            with timed(t, "vre_and_vae_encode_overlapped", dev):
                z, prompt, _ = pipe._encode(lq, "mode", None)
        else:
            with timed(t, "vre_and_adapter", dev):
                prompt = pipe.encode_prompt(lq)
            with timed(t, "vae_encode", dev):
                z = pipe.encode_latent(lq)
                pipe.plan.between_stages(z)  # as pipe._encode does (heap trimming on CPU)
        with timed(t, "unet", dev):
            eps = pipe.unet(z, pipe.timestep, encoder_hidden_states=prompt.to(z.dtype)).sample
        with timed(t, "x0", dev):
            x0 = pipe.predict_x0(z, eps)
        with timed(t, "vae_decode", dev):
            out = pipe._decode(x0, check_finite=False)  # heap trimmed before (the UNet's memory) and after
        with timed(t, "postprocess", dev):
            to_uint8(out.float())
    t["total"] = sum(t.values())
    return t


def compare_lean(pipe) -> dict:
    """Decode one random latent plainly and with the memory-lean decode: max |difference|, peak RSS of each."""
    g = torch.Generator().manual_seed(0)
    lat = pipe.resolution // 8
    x0 = (torch.randn(1, 4, lat, lat, generator=g) / pipe.vae.config.scaling_factor).to(pipe.device)
    out, peaks = {}, {}
    keep = pipe.plan
    with torch.inference_mode():
        for lean in (False, True, False, True):  # twice each: the first decode also pages weights in
            pipe.set_lean_decode(lean, keep.lean_band_mb)
            collect()
            with RSSSampler() as r:
                out[lean] = pipe.decode(x0).float().cpu()
                sync(pipe.device)
            peaks[lean] = round(r.peak - r.start, 3)
    pipe.set_lean_decode(keep.lean_decode, keep.lean_band_mb)
    diff = (out[True] - out[False]).abs().max().item()
    return {"max_abs_diff": diff, "identical": diff == 0.0,
            "decode_rss_increase_gb": {"plain": peaks[False], "lean": peaks[True]}}


def measure_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured throughput of a large 3×3 convolution and a large matmul on this device (TFLOP/s)."""

    def rate(fn, flops: float) -> float:
        fn()
        sync(device)
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < 2.0:
            fn()
            n += 1
        sync(device)
        return round(flops * n / (time.perf_counter() - t0) / 1e12, 4)

    with torch.inference_mode():
        conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device, dtype)
        x = torch.randn(1, 256, 128, 128, device=device, dtype=dtype)
        a = torch.randn(2048, 2048, device=device, dtype=dtype)
        b = torch.randn(2048, 2048, device=device, dtype=dtype)
        return {"conv3x3_tflops": rate(lambda: conv(x), 2 * 256 * 256 * 9 * 128 * 128),
                "matmul_tflops": rate(lambda: a @ b, 2 * 2048**3)}


def official_baseline(pipe, n: int, ours_runs: dict) -> dict:
    """Time the official execution pattern on ``n`` images and compare outputs with ours."""
    import numpy as np
    from official_pattern import official_restore_one
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (pipe.resolution, pipe.resolution, 3), dtype=np.uint8))
            for _ in range(n)]
    official_restore_one(pipe, imgs[0])  # warm-up
    t0 = time.perf_counter()
    outs = [official_restore_one(pipe, im) for im in imgs]
    sec = (time.perf_counter() - t0) / n
    ours = pipe(np.stack([np.asarray(im) for im in imgs]), output_type="uint8", rounding="truncate").images
    diff = np.abs(ours.astype(int) - np.stack(outs).astype(int))
    return {"seconds_per_face": round(sec, 4), "faces_per_second": round(1 / sec, 3),
            "max_abs_uint8_diff_vs_ours": int(diff.max()), "mean_abs_uint8_diff_vs_ours": float(diff.mean())}


def count_flops(pipe, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(batch, 3, pipe.resolution, pipe.resolution)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        pipe(x)
    return float(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per batch size (after one warm-up)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "osdface-bench-sd21-random"))
    ap.add_argument("--flops", action="store_true", help="count FLOPs and measure the device's conv/matmul peak")
    ap.add_argument("--official-baseline", type=int, default=0, metavar="N",
                    help="also run the official execution pattern on N images and compare outputs")
    ap.add_argument("--tiny", action="store_true", help="tiny 64-px random model (smoke test of this script)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--lean-decode", choices=("auto", "on", "off"), default="auto",
                    help="memory-lean VAE decode (auto = the pipeline default: on for CPU)")
    ap.add_argument("--overlap-encoders", action="store_true",
                    help="CUDA: VRE on a side stream while the VAE encodes (pipe.enable_encoder_overlap)")
    ap.add_argument("--no-heap-trim", action="store_true",
                    help="do not return free heap memory to the OS between stages (default on CPU)")
    ap.add_argument("--compare-lean", action="store_true",
                    help="decode one batch with and without the lean decode: max difference and peak RSS")
    args = ap.parse_args()

    from osdface.pipelines import OSDFacePipeline

    if args.tiny:
        from osdface.testing import tiny_components
        folder = Path(tempfile.mkdtemp()) / "tiny"
        OSDFacePipeline(**tiny_components(0)).save_pretrained(folder)
    else:
        folder = build_random_model_folder(Path(args.model_dir))
    weights_gb = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e9
    collect()
    rss0 = rss_gb()
    t0 = time.perf_counter()
    with RSSSampler() as load_rss:
        pipe = OSDFacePipeline.from_pretrained(folder, torch_dtype=args.dtype, device=args.device)
        sync(pipe.device)
    if args.channels_last:
        pipe.enable_channels_last()
    if args.compile:
        pipe.compile()
    pipe.set_lean_decode({"auto": None, "on": True, "off": False}[args.lean_decode])
    pipe.enable_encoder_overlap(args.overlap_encoders)
    pipe.set_heap_trimming(False if args.no_heap_trim else None)
    result = {
        "benchmark": "restore",
        "machine": machine(),
        "device": str(pipe.device),
        "dtype": args.dtype,
        "resolution": pipe.resolution,
        "weights_gb_on_disk": round(weights_gb, 3),
        "load_seconds": round(time.perf_counter() - t0, 2),
        "load_peak_rss_gb": round(load_rss.peak, 3),
        "load_rss_increase_gb": round(load_rss.peak - rss0, 3),
        "params_millions": {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for n, m in pipe.modules().items()},
        "options": {"channels_last": args.channels_last, "compile": args.compile, "lean_decode": args.lean_decode,
                    "overlap_encoders": args.overlap_encoders,
                    "heap_trim_between_stages": not args.no_heap_trim and pipe.device.type == "cpu"},
        "execution_plan": pipe.plan.resolve(pipe.device, grad_enabled=False).as_dict(),
        "runs": [],
    }
    for bs in args.batch_sizes:
        x = torch.randint(0, 256, (bs, 3, pipe.resolution, pipe.resolution), dtype=torch.uint8)
        if pipe.device.type == "cuda":
            x = x.pin_memory()
            torch.cuda.reset_peak_memory_stats()
        if not args.no_warmup:
            stage_times(pipe, x)
        best = None
        with RSSSampler() as run_rss:
            for _ in range(args.repeats):
                t = stage_times(pipe, x)
                best = t if best is None or t["total"] < best["total"] else best
        run = {
            "batch_size": bs,
            "seconds": {k: round(v, 4) for k, v in best.items()},
            "seconds_per_face": round(best["total"] / bs, 4),
            "faces_per_second": round(bs / best["total"], 3),
            "peak_rss_gb": round(run_rss.peak, 3),
        }
        if pipe.device.type == "cuda":
            run["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        result["runs"].append(run)
    if args.flops:
        flops = count_flops(pipe, 1)
        result["flops_per_face"] = flops
        result["device_peak"] = measure_peak(pipe.device, pipe.dtype)
        for r in result["runs"]:
            r["achieved_tflops"] = round(flops / r["seconds_per_face"] / 1e12, 4)
            r["fraction_of_conv_peak"] = round(r["achieved_tflops"] / result["device_peak"]["conv3x3_tflops"], 3)
    if args.compare_lean:
        result["lean_decode_check"] = compare_lean(pipe)
    if args.official_baseline:
        base = official_baseline(pipe, args.official_baseline, result["runs"])
        best = min(r["seconds_per_face"] for r in result["runs"])
        base["speedup_ours_best_vs_official"] = round(base["seconds_per_face"] / best, 2)
        result["official_pattern"] = base
    result["process_peak_rss_gb"] = round(peak_rss_gb(), 3)
    emit(result)


if __name__ == "__main__":
    main()
