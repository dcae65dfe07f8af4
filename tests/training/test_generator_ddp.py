"""A 2-process DDP stage-2 run on the CPU (gloo) through ``accelerate launch`` equals a 1-process run
with twice the batch (the same faces, the same per-sample GAN noise, gradients averaged)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import free_port, generator_trained_tensors

from osdface.testing import tiny_components
from osdface.training.checkpoint import latest_checkpoint, read_trainer_state
from osdface.training.generator_config import load_generator_config
from osdface.training.generator_task import train_generator

HERE = Path(__file__).resolve().parent
TINY = HERE.parents[1] / "configs" / "generator-tiny.yaml"
OVERRIDES = ["train.max_steps=2", "train.ckpt_every=2", "train.log_every=1", "train.val_every=0",
             "data.val_images=0", "loss.ea_dists=0", "loss.identity=0"]


@pytest.mark.slow  # multi-second optimisation / multi-process run: ./test.sh --all (CI)
def test_two_process_ddp_equals_one_process_with_twice_the_batch(tmp_path, face_dir):
    run = tmp_path / "ddp"
    # accelerate's torchrun launcher; the worker asks for the CPU → a MULTI_CPU group on gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(HERE / "_generator_ddp_worker.py"), str(TINY), str(face_dir), str(run), *OVERRIDES,
           "train.batch_size=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [2, 2]
    assert all("MULTI_CPU" in r["distributed_type"] and r["backend"] == "gloo" for r in ranks)
    assert all(r["wrapped"] == ["DistributedDataParallel"] * 2 for r in ranks)
    f0, f1 = ranks[0]["fingerprint"], ranks[1]["fingerprint"]  # all-reduced: same G and D on both
    assert f0.keys() == f1.keys() and any(k.startswith("d.head") for k in f0)
    assert all(abs(f0[k] - f1[k]) <= 1e-9 * max(1.0, abs(f0[k])) for k in f0)
    ck = latest_checkpoint(run)
    assert ck.name == "step-0000002" and read_trainer_state(ck)["num_processes"] == 2
    # the same two steps in one process with batch 2
    single = tmp_path / "single"
    c = tiny_components(0)
    torch.set_num_threads(1)
    train_generator(load_generator_config(TINY, [*OVERRIDES, "train.batch_size=2"]), [face_dir], single, cpu=True,
                    components={k: c[k] for k in ("vae", "unet", "scheduler", "vre")})
    a, b = generator_trained_tensors(ck), generator_trained_tensors(latest_checkpoint(single))
    assert a.keys() == b.keys()

    def norm(keys, x):
        return math.sqrt(sum(float((x(k) ** 2).sum()) for k in keys))

    # LoRA B starts at zero, so its value is the whole update: DDP and 1-process updates agree to < 1 %
    for prefix in ("lora.", "disc."):
        keys = [k for k in a if k.startswith(prefix) and ".lora_B." in k]
        assert keys and norm(keys, lambda k: a[k]) > 0
        assert norm(keys, lambda k: a[k] - b[k]) < 1e-2 * norm(keys, lambda k: a[k]), prefix
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("adapter.")) < 1e-4
    # Adam's first steps are ≈ lr·sign(g): summation-order noise in near-zero gradients can flip a
    # sign, so single entries may differ by up to 2·lr — never more
    lr = load_generator_config(TINY).optim.lr
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2 * lr
