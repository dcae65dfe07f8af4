"""Shared helpers for the benchmarks: random real-size models on disk, RSS sampling, timing."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_rss_gb() -> float:
    """Peak resident set of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class RSSSampler:
    """Samples RSS every ``interval`` s in a thread; ``.peak`` is the max seen between start/stop."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_gb()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_gb())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_gb())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def timed(out: dict, key: str, device: torch.device):
    sync(device)
    t = time.perf_counter()
    yield
    sync(device)
    out[key] = out.get(key, 0.0) + time.perf_counter() - t


def build_random_model_folder(path: Path, seed: int = 0) -> Path:
    """Write an osdface model folder with the real SD 2.1-base / OSDFace sizes and random weights.

    Runs in a subprocess so that the benchmark process's peak RSS is not inflated by building.
    """
    if (path / "model_index.json").is_file():
        return path
    code = f"""
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from osdface.models.prompt_encoder import PromptAdapter, VisualPromptEncoder
from osdface.pipelines import OSDFacePipeline
from osdface.testing import SD21_UNET_CONFIG, SD21_VAE_CONFIG, sd21_scheduler
torch.manual_seed({seed})
vre = VisualPromptEncoder()
with torch.no_grad():
    vre.quantize.embedding.weight.normal_(0, 1)
pipe = OSDFacePipeline(AutoencoderKL(**SD21_VAE_CONFIG), UNet2DConditionModel(**SD21_UNET_CONFIG), vre,
                       PromptAdapter(512, 1024), sd21_scheduler())
pipe.save_pretrained({str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2))


def machine() -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
