"""Run under ``accelerate launch --num_processes 2``: a short stage-1 run, then each process
writes what it saw (dataset indices per epoch) and a fingerprint of its parameters."""

import json
import sys
from pathlib import Path

import torch

from osdface.data.datasets import DegradedFaceDataset
from osdface.training.config import dump_yaml
from osdface.training.trainer import Trainer
from osdface.training.vre import VRETask, load_vre_config


class Recording(DegradedFaceDataset):
    seen: list

    def __getitem__(self, index):
        self.seen.append((self.epoch, int(index)))
        return super().__getitem__(index)


def main(config: str, data: str, run_dir: str, *overrides: str) -> None:
    torch.set_num_threads(1)
    cfg = load_vre_config(config, list(overrides))
    ds = Recording([data], degradation=cfg.data.degradation, size=cfg.data.size, hflip=cfg.data.hflip,
                   seed=cfg.train.seed)
    ds.seen = []
    task = VRETask(cfg)
    trainer = Trainer(cfg.train, task, ds, run_dir, resolved_config=dump_yaml(cfg), val_images=0, cpu=True)
    result = trainer.fit()
    acc = trainer.accelerator
    # parameters only: BatchNorm running statistics are rank-local between DDP's buffer broadcasts
    params = {k: v.detach().double() for k, v in task.gen_module.named_parameters()}
    params.update({f"disc.{k}": v.detach().double() for k, v in task.disc_module.named_parameters()})
    fingerprint = {k: float(v.sum()) + float((v * v).sum()) for k, v in params.items()}
    out = {"rank": acc.process_index, "world": acc.num_processes, "backend": str(acc.state.backend),
           "distributed_type": str(acc.distributed_type), "seen": ds.seen, "fingerprint": fingerprint,
           "step": result["step"], "wrapped": type(task.gen).__name__}
    Path(run_dir, f"rank{acc.process_index}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
