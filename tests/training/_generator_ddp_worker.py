"""Run under ``accelerate launch --num_processes 2``: a short stage-2 run on tiny components, then
each process writes its world, backend, wrapper type and a fingerprint of its trainable tensors."""

import json
import sys
from pathlib import Path

import torch

from osdface.testing import tiny_components
from osdface.training.config import dump_yaml
from osdface.training.generator_config import load_generator_config
from osdface.training.generator_task import GeneratorTask, build_dataset
from osdface.training.trainer import Trainer


def main(config: str, data: str, run_dir: str, *overrides: str) -> None:
    torch.set_num_threads(1)
    cfg = load_generator_config(config, list(overrides))
    c = tiny_components(0)  # seeded: identical on every process
    task = GeneratorTask(cfg, {k: c[k] for k in ("vae", "unet", "scheduler", "vre")})
    trainer = Trainer(cfg.train, task, build_dataset(cfg, [data]), run_dir, resolved_config=dump_yaml(cfg),
                      val_images=0, cpu=True)
    result = trainer.fit()
    acc = trainer.accelerator
    params = {f"g.{n}": p.detach().double() for n, p in task.gen_module.named_parameters() if p.requires_grad}
    params.update({f"d.{n}": p.detach().double() for n, p in task.disc_module.named_parameters() if p.requires_grad})
    fingerprint = {k: float(v.sum()) + float((v * v).sum()) for k, v in params.items()}
    out = {"rank": acc.process_index, "world": acc.num_processes, "backend": str(acc.state.backend),
           "distributed_type": str(acc.distributed_type), "fingerprint": fingerprint, "step": result["step"],
           "wrapped": [type(task.gen).__name__, type(task.disc).__name__]}
    Path(run_dir, f"rank{acc.process_index}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
