"""A 2-process DDP stage-1 run on the CPU (gloo) through ``accelerate launch``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import free_port

from osdface.training.checkpoint import latest_checkpoint, read_trainer_state

HERE = Path(__file__).resolve().parent
TINY = HERE.parents[1] / "configs" / "vre-tiny.yaml"


@pytest.mark.slow  # multi-second optimisation / multi-process run: ./test.sh --all (CI)
def test_two_process_ddp_run_on_cpu(tmp_path, face_dir):
    run = tmp_path / "run"
    # 9 faces over 2 processes × batch 2 → 2 micro-batches per process per epoch; 3 steps cross an epoch
    overrides = ["train.max_steps=3", "train.batch_size=2", "train.ckpt_every=3", "loss.disc_start=1",
                 "loss.lpips=0", "train.val_every=0", "train.log_every=1"]
    # accelerate's torchrun launcher (--multi_gpu); the worker asks for the CPU, so the two
    # processes form a MULTI_CPU group on gloo (accelerate's --cpu launcher would need mpirun)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(HERE / "_ddp_worker.py"), str(TINY), str(face_dir), str(run), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert all("MULTI_CPU" in r["distributed_type"] and r["backend"] == "gloo" for r in ranks)
    assert all(r["wrapped"] == "DistributedDataParallel" for r in ranks)
    # each process saw its own shard: per epoch, the two ranks' indices are disjoint
    for epoch in (0, 1):
        s0 = {i for e, i in ranks[0]["seen"] if e == epoch}
        s1 = {i for e, i in ranks[1]["seen"] if e == epoch}
        assert s0 and s1 and not (s0 & s1)
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 3 * 2
    # gradients were all-reduced: identical parameters on both processes (G, logit scale and D)
    f0, f1 = ranks[0]["fingerprint"], ranks[1]["fingerprint"]
    assert f0.keys() == f1.keys() and "assoc.logit_scale" in f0
    assert all(abs(f0[k] - f1[k]) <= 1e-9 * max(1.0, abs(f0[k])) for k in f0)
    # rank 0 wrote one checkpoint for the whole run, recording the world size
    ck = latest_checkpoint(run)
    assert ck.name == "step-0000003" and read_trainer_state(ck)["num_processes"] == 2
    assert {p.name for p in (ck / "accelerate_state").iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl"}
    assert (run / "export" / "vre" / "config.json").is_file()
