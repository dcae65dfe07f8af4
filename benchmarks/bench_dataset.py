"""Throughput of the on-the-fly LQ synthesis dataset (``DegradedFaceDataset``) at 512².

Writes ``--images`` distinct 512×512 PNGs (crops of scikit-image's bundled photos) to a temporary
folder, then times a ``DataLoader`` with ``--workers`` processes over them (after one warm-up
pass that starts the workers and fills the page cache), for each preset. Also measures the CPU
time of one item and of the bare degradation in this process (one OpenCV thread): on a shared
machine the wall-clock images/s depends on the load, the CPU time much less. Prints JSON.

    .venv/bin/python benchmarks/bench_dataset.py --workers 2 --images 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from osdface.data.datasets import DegradedFaceDataset
from osdface.data.degradation import PRESETS, Degrader, image_seed
from osdface.image import save_image


def make_hq_folder(folder: Path, n: int, size: int = 512) -> None:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
              np.repeat(data.camera()[..., None], 3, axis=2)]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = cv2.resize(img[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_CUBIC)
        save_image(folder / f"{i:05d}.png", crop)


def time_loader(root: Path, preset: str, workers: int, batch_size: int, epochs: int) -> float:
    ds = DegradedFaceDataset(root, degradation=preset, size=512, seed=0)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up: worker start-up, page cache
        pass
    n, t0 = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        ds.set_epoch(epoch)  # new draws each epoch (shared with the persistent workers)
        for batch in loader:
            n += batch["lq"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {
        "benchmark": "DegradedFaceDataset images/s at 512x512 (read PNG + resize + flip + degrade + to tensor)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "opencv": cv2.__version__, "torch": torch.__version__,
        "images": args.images, "workers": args.workers, "batch_size": args.batch_size,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "loader_images_per_s": {}, "degrade_only_ms_per_image_1_thread": {},  # CPU ms
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_hq_folder(root, args.images)
        for preset in PRESETS:
            result["loader_images_per_s"][preset] = round(
                time_loader(root, preset, args.workers, args.batch_size, args.epochs), 1)
        cv2.setNumThreads(1)
        # CPU time per item in this process (load-independent, unlike wall time): the images/s
        # two idle cores could deliver is about 2000 / this.
        result["item_cpu_ms_1_thread"] = {}
        for preset in PRESETS:
            ds = DegradedFaceDataset(root, degradation=preset, size=512, seed=0)
            t0 = time.process_time()
            for i in range(len(ds)):
                ds[i]
            result["item_cpu_ms_1_thread"][preset] = round((time.process_time() - t0) / len(ds) * 1e3, 1)
        result["idle_2core_estimate_images_per_s"] = {
            k: round(2000.0 / v, 1) for k, v in result["item_cpu_ms_1_thread"].items()}
        hq = cv2.resize(__import__("skimage.data", fromlist=["astronaut"]).astronaut(), (512, 512))
        for preset in PRESETS:
            deg = Degrader(preset)
            t0 = time.process_time()
            reps = 40
            for i in range(reps):
                deg(hq, image_seed(0, str(i)))
            result["degrade_only_ms_per_image_1_thread"][preset] = round((time.process_time() - t0) / reps * 1e3, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
