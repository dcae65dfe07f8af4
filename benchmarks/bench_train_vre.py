"""CPU/GPU step time of the stage-1 (VRE) training step at paper size, random weights.

One step = G step (both branches in phase ``assoc``: encoder, quantiser, decoder, L1 + LPIPS-VGG,
VQ, adaptive hinge GAN, association) + D step (PatchGAN on reals and detached fakes) + the two
Adam updates; batch 1 at 512² by default. Prints one JSON object.

    python benchmarks/bench_train_vre.py --phase assoc --steps 2
    python benchmarks/bench_train_vre.py --phase hq --device cuda --precision bf16 --batch 4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vre-paper.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", default="assoc", choices=["hq", "lq", "assoc"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--lpips", type=float, default=1.0, help="LPIPS weight (0 drops the VGG; default 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from osdface.training.vre import VRETask, load_vre_config

    cfg = load_vre_config(CONFIG, [f"phase={args.phase}", "loss.disc_start=0", f"train.batch_size={args.batch}",
                                   "loss.lpips_pretrained=false", f"loss.lpips={args.lpips}",
                                   f"model.vqgan.resolution={args.size}", f"data.size={args.size}",
                                   f"train.mixed_precision={args.precision}"])
    acc = Accelerator(cpu=args.device == "cpu", mixed_precision=args.precision)
    torch.manual_seed(0)
    task = VRETask(cfg)
    task.build(acc)
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(args.batch, 3, args.size, args.size, generator=g).to(acc.device) for k in ("gt", "lq")}

    def step(i: int) -> None:
        task.train_micro_step(batch, i, 1.0)
        task.optimizer_step(i)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()

    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step(0)
    warm = time.perf_counter() - t0
    times, cpu_times = [], []
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(i + 1)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    gen = task.gen_module
    out = {
        "benchmark": "train_vre_step",
        "phase": args.phase, "batch": args.batch, "size": args.size, "precision": args.precision,
        "lpips_weight": args.lpips, "device": str(acc.device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "generator_params_m": round(sum(p.numel() for p in gen.parameters()) / 1e6, 2),
        "discriminator_params_m": round(sum(p.numel() for p in task.disc_module.parameters()) / 1e6, 2),
        "warmup_s": round(warm, 2),
        "step_s": [round(t, 3) for t in times],
        "step_s_mean": round(sum(times) / len(times), 3),
        "step_cpu_s_mean": round(sum(cpu_times) / len(cpu_times), 3),  # process CPU time (all threads)
        "load_avg_1min": round(__import__("os").getloadavg()[0], 2),
        "images_per_s": round(args.batch / (sum(times) / len(times)), 4),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if acc.device.type == "cuda":
        out["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
