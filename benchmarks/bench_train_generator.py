"""Memory and step time of the stage-2 (generator) training step at paper size, random weights.

Paper recipe sizes: SD 2.1-base UNet (865.9 M) + VAE (83.7 M) + the released VRE architecture
(29.2 M) + prompt adapter; LoRA r 16 / α 16 on the spec's targets; the latent discriminator (SD
UNet encoder half + LoRA r 16 + MLP head); MSE + EA-DISTS (VGG16) + identity (ArcFace ResNet-18)
+ latent GAN, all networks random (no weight files). One step = G step (forward through VRE, VAE
encoder, UNet, x0, VAE decoder; losses; backward) + D step (VAE-encode GT, D on real/fake) + both
AdamW updates. Prints one JSON object.

    python benchmarks/bench_train_generator.py --steps 1                      # CPU, batch 1 at 512², fp32
    python benchmarks/bench_train_generator.py --size 256 --steps 1           # reduced variant
    python benchmarks/bench_train_generator.py --device cuda --precision bf16 --batch 4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "generator-paper.yaml"


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB → GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=512, help="face side (the VRE is built for this resolution)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps (after one warm-up step; 0: warm-up only)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--frozen-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--no-gradient-checkpointing", dest="ckpt", action="store_false")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from osdface.models.prompt_encoder import VisualPromptEncoder
    from osdface.testing import SD21_UNET_CONFIG, SD21_VAE_CONFIG, sd21_scheduler
    from osdface.training.generator import GeneratorTask, load_generator_config

    cfg = load_generator_config(CONFIG, [
        f"train.batch_size={args.batch}", f"train.mixed_precision={args.precision}", f"data.size={args.size}",
        "loss.perceptual_pretrained=false", "loss.identity_pretrained=false", "val.pretrained=false",
        f"model.gradient_checkpointing={'true' if args.ckpt else 'false'}", f"model.frozen_dtype={args.frozen_dtype}"])
    acc = Accelerator(cpu=args.device == "cpu", mixed_precision=args.precision)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    comps = {"unet": UNet2DConditionModel(**SD21_UNET_CONFIG), "vae": AutoencoderKL(**SD21_VAE_CONFIG),
             "vre": VisualPromptEncoder(resolution=args.size), "scheduler": sd21_scheduler()}
    sizes = {k: sum(p.numel() for p in v.parameters()) / 1e6 for k, v in comps.items() if k != "scheduler"}
    task = GeneratorTask(cfg, comps)
    task.build(acc)
    del comps
    build_s = time.perf_counter() - t0
    g_train = sum(p.numel() for p in task.gen_module.parameters() if p.requires_grad) / 1e6
    d_total = sum(p.numel() for p in task.disc_module.parameters()) / 1e6
    d_train = sum(p.numel() for p in task.disc_module.parameters() if p.requires_grad) / 1e6
    rss_built = _rss_gib()
    gen = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(acc.device) for k in ("gt", "lq")}
    batch["index"] = torch.arange(args.batch)
    cuda = acc.device.type == "cuda"

    def step(i: int) -> dict[str, float]:
        t = time.perf_counter()
        logs = task.train_micro_step(batch, i, 1.0)
        if cuda:
            torch.cuda.synchronize()
        t_gd = time.perf_counter() - t
        task.optimizer_step(i)
        if cuda:
            torch.cuda.synchronize()
        return {"g_and_d_s": t_gd, "step_s": time.perf_counter() - t, "g_total": logs["g_total"]}

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warm = step(0)
    timed = [step(i + 1) for i in range(args.steps)]
    out = {
        "benchmark": "train_generator_step",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "batch": args.batch, "size": args.size, "precision": args.precision,
        "frozen_dtype": args.frozen_dtype, "gradient_checkpointing": args.ckpt,
        "params_M": {**{k: round(v, 2) for k, v in sizes.items()}, "generator_trainable": round(g_train, 2),
                     "discriminator_total": round(d_total, 2), "discriminator_trainable": round(d_train, 2)},
        "build_s": round(build_s, 1),
        "warmup_step_s": round(warm["step_s"], 2),
        "step_s": [round(r["step_s"], 2) for r in timed],
        "mean_step_s": round(sum(r["step_s"] for r in timed) / len(timed), 2) if timed else None,
        "peak_rss_after_build_GiB": round(rss_built, 2),
        "peak_rss_GiB": round(_rss_gib(), 2),
        "g_total_finite": all(torch.isfinite(torch.tensor(r["g_total"])) for r in [warm, *timed]),
    }
    if cuda:
        out["peak_cuda_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
