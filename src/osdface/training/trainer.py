"""The generic training loop shared by both stages (accelerate; DDP, mixed precision, accumulation).

The stage-specific part is a :class:`TrainingTask` (models, losses, the G/D steps, validation,
export). :class:`Trainer` owns everything else:

* the accelerator (single/multi-GPU, multi-node DDP, CPU/gloo; mixed precision);
* data order: a seeded per-epoch permutation sharded over processes (:class:`ShardedEpochSampler`),
  with the consumed micro-batches of the current epoch skipped on resume, so a resumed run sees
  exactly the batches an uninterrupted one would;
* gradient accumulation (``no_sync`` on all but the last micro-batch);
* logging: running means of every scalar the task returns, learning rates, throughput and the
  task's interval statistics, to TensorBoard (``RUN/logs``) and ``RUN/log.jsonl``; validation
  scalars and images at ``train.val_every``;
* checkpoints (:mod:`osdface.training.checkpoint`) and ``resume`` (from the newest intact
  checkpoint: a corrupt newer one is skipped with a warning);
* undecodable training images: the dataset replaces them (see
  :class:`~osdface.data.datasets.DegradedFaceDataset`); their count is logged as
  ``data/undecodable_images`` and returned by :meth:`Trainer.fit`.

Multi-node runs need ``RUN_DIR`` on a filesystem every node can see.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import OSDFaceError, WeightsNotFoundError
from ..utils.io import write_text_atomic
from ..utils.logging import get_logger
from .checkpoint import (
    checkpoint_folders,
    latest_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    remove_unfinished_saves,
    restore_accelerate_state,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig

logger = get_logger(__name__)


class RunExistsError(OSDFaceError, FileExistsError):
    """The run folder already holds checkpoints and ``resume`` was not asked for (nothing is overwritten)."""


class TrainingDivergedError(OSDFaceError, FloatingPointError):
    """A loss became NaN or infinite; no checkpoint of the diverged state is written."""


class TrainingTask(abc.ABC):
    """The stage-specific half of a run. The trainer calls, in order: :meth:`build` once, then per
    step ``grad_accum`` × :meth:`train_micro_step` and one :meth:`optimizer_step`; now and then
    :meth:`validate`, :meth:`pop_interval_stats`, :meth:`checkpoint_modules`; :meth:`export` at the end.
    """

    @abc.abstractmethod
    def build(self, accelerator) -> None:
        """Create models, losses and optimisers and ``accelerator.prepare`` them."""

    @abc.abstractmethod
    def train_micro_step(self, batch: dict[str, Any], step: int, loss_scale: float) -> dict[str, float]:
        """Forward + backward of one micro-batch (losses multiplied by ``loss_scale``); returns scalars."""

    @abc.abstractmethod
    def optimizer_step(self, step: int) -> None:
        """Apply the accumulated gradients (learning rates for ``step``), then zero them."""

    @abc.abstractmethod
    def ddp_modules(self) -> list[nn.Module]:
        """The prepared (possibly DDP-wrapped) modules that receive gradients (for ``no_sync``)."""

    @abc.abstractmethod
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Unwrapped ``ModelMixin`` components saved as ``name/`` (config.json + safetensors)."""

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Loose tensors saved in ``extra.safetensors`` (e.g. a learnable logit scale)."""
        return {}

    def learning_rates(self) -> dict[str, float]:
        """Current learning rate per optimiser (logged)."""
        return {}

    def pop_interval_stats(self) -> dict[str, float]:
        """Statistics aggregated since the last call (e.g. codebook usage), then reset."""
        return {}

    def validate(self, batches: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Scalars and image grids (``(N, 3, H, W)`` in [0, 1]) on fixed validation batches."""
        return {}, {}

    def export(self, out_dir: Path) -> list[Path]:
        """Write the run's deliverables (main process only); returns the written paths."""
        return []

    @staticmethod
    def batch_images(batch: dict[str, Any]) -> int:
        """Images in a micro-batch (for throughput)."""
        return int(batch["gt"].shape[0])


class ShardedEpochSampler(Sampler[int]):
    """Seeded per-epoch permutation, split over processes; drops the tail that does not divide.

    Rank ``r`` of ``w`` gets ``perm[r::w]`` of the first ``w·⌊n/w⌋`` entries of
    ``randperm(n, seed + epoch)``. :attr:`skip` drops the first ``skip`` of them (resume).
    """

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        if n < num_replicas:
            raise ConfigError(f"{n} training images cannot be shared by {num_replicas} processes")
        self.n, self.num_replicas, self.rank, self.seed, self.shuffle = n, num_replicas, rank, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        per_rank = self.n // self.num_replicas
        return perm[: per_rank * self.num_replicas][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return self.n // self.num_replicas - self.skip


class Trainer:
    """Run a :class:`TrainingTask` on a dataset.

    Args:
        config: the generic loop settings.
        task: the stage-specific part.
        train_dataset: items ``{"lq", "gt": (3, H, W) float in [0, 1], ...}``; an optional
            ``set_epoch(e)`` is called at each epoch.
        run_dir: output folder (``checkpoints/``, ``logs/``, ``log.jsonl``, ``config.yaml``, ``export/``).
        resolved_config: YAML text of the full experiment config (saved with every checkpoint).
        val_dataset: validation items (default: the training set at epoch 0).
        num_workers: DataLoader workers per process.
        resume: continue from the newest intact checkpoint in ``run_dir`` (error when there is none).
        cpu: force the CPU even when an accelerator is present.

    Raises (from :meth:`fit`):
        RunExistsError: ``run_dir`` holds checkpoints but ``resume`` is off.
        WeightsNotFoundError: ``resume`` but no checkpoint.
        ModelFileError: no usable checkpoint, or the training state cannot be read (naming the file).
    """

    def __init__(self, config: TrainConfig, task: TrainingTask, train_dataset: Dataset, run_dir: str | Path,
                 resolved_config: str = "", val_dataset: Dataset | None = None, num_workers: int = 0,
                 val_images: int = 4, resume: bool = False, cpu: bool = False):
        self.cfg, self.task, self.dataset = config, task, train_dataset
        self.run_dir = Path(run_dir)
        self.resolved_config = resolved_config
        self.val_dataset = val_dataset
        self.num_workers, self.val_images = num_workers, val_images
        self.resume, self.cpu = resume, cpu
        self.step = 0
        self.epoch, self.batch_in_epoch = 0, 0
        self.accelerator = None
        self._writer = None
        self.resumed_from: Path | None = None  # the validated checkpoint a resumed run started from

    # ------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.accelerator = Accelerator(
            mixed_precision=self.cfg.mixed_precision, cpu=self.cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        acc = self.accelerator
        set_seed(self.cfg.seed)  # identical initialisation on every process
        existing = checkpoint_folders(self.run_dir)
        if existing and not self.resume:
            raise RunExistsError(
                f"{self.run_dir} already holds checkpoints (latest {existing[-1].name}); pass resume (--resume) "
                "to continue that run, or choose a new run folder")
        ckpt = latest_checkpoint(self.run_dir) if self.resume else None  # newest intact one, validated
        self.resumed_from = ckpt
        if self.resume and ckpt is None:
            raise WeightsNotFoundError(f"resume requested but {self.run_dir / 'checkpoints'} holds no checkpoint")
        self.task.build(acc)
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            restore_accelerate_state(acc, ckpt)
            self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            if state.get("num_processes") != acc.num_processes or state.get("batch_size") != self.cfg.batch_size:
                logger.warning("resuming with %d process(es) × batch %d (checkpoint: %s × %s): the data order "
                               "continues from the next epoch", acc.num_processes, self.cfg.batch_size,
                               state.get("num_processes"), state.get("batch_size"))
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            logger.info("resumed from %s (step %d, epoch %d, batch %d)", ckpt, self.step, self.epoch,
                        self.batch_in_epoch)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_unfinished_saves(self.run_dir)
            write_text_atomic(self.run_dir / "config.yaml", self.resolved_config)
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "logs"))
        acc.wait_for_everyone()

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches forever, tracking (epoch, batch_in_epoch) for resume."""
        acc = self.accelerator
        bs = self.cfg.batch_size
        sampler = ShardedEpochSampler(len(self.dataset), acc.num_processes, acc.process_index, self.cfg.seed)
        per_epoch = (len(self.dataset) // acc.num_processes) // bs
        if per_epoch < 1:
            raise ConfigError(f"{len(self.dataset)} training images are too few for {acc.num_processes} "
                              f"process(es) × batch {bs} (train.batch_size)", key="train.batch_size")
        while True:
            if self.batch_in_epoch >= per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            sampler.set_epoch(self.epoch)
            sampler.skip = self.batch_in_epoch * bs
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = DataLoader(self.dataset, batch_size=bs, sampler=sampler, drop_last=True,
                                num_workers=self.num_workers, pin_memory=acc.device.type == "cuda")
            for batch in _reraised_from_workers(loader):
                self.batch_in_epoch += 1
                yield {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def undecodable_images(self) -> int:
        """Training files found undecodable so far, over all processes (a collective: call on every process)."""
        mask = getattr(self.dataset, "undecodable_mask", None)
        if mask is None:
            return 0
        acc = self.accelerator
        if acc.num_processes > 1:
            mask = acc.reduce(mask.to(acc.device, torch.int32), reduction="sum")
        return int((mask > 0).sum())

    def _validation_batches(self) -> list[dict[str, Any]]:
        ds = self.val_dataset if self.val_dataset is not None else self.dataset
        n = min(self.val_images, len(ds))
        if n == 0:
            return []
        epoch = getattr(ds, "epoch", None)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(0)
        items = [ds[i] for i in range(n)]
        if epoch is not None:
            ds.set_epoch(epoch)
        batch = torch.utils.data.default_collate([{k: v for k, v in it.items() if torch.is_tensor(v)}
                                                  for it in items])
        bs = max(1, self.cfg.batch_size)
        dev = self.accelerator.device
        return [{k: v[i : i + bs].to(dev) for k, v in batch.items()} for i in range(0, n, bs)]

    # ---------------------------------------------------------------------- logging
    def _log(self, scalars: dict[str, float], images: dict[str, torch.Tensor] | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        for k, v in scalars.items():
            self._writer.add_scalar(k, v, self.step)
        for k, img in (images or {}).items():
            self._writer.add_images(k, img.float().clamp(0, 1).cpu(), self.step)
        self._writer.flush()
        line = json.dumps({"step": self.step, **{k: round(float(v), 6) for k, v in scalars.items()}})
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(line + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        acc = self.accelerator
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "num_processes": acc.num_processes, "batch_size": self.cfg.batch_size,
                 "grad_accum": self.cfg.grad_accum, "seed": self.cfg.seed}
        path = save_checkpoint(acc, self.run_dir, self.step, self.task.checkpoint_modules(),
                               self.task.extra_tensors(), state, self.resolved_config)
        if acc.is_main_process and self.cfg.keep_last:
            prune_checkpoints(self.run_dir, self.cfg.keep_last)
        acc.wait_for_everyone()
        return path

    def _validate(self, batches) -> None:
        acc = self.accelerator
        if acc.is_main_process and batches:
            scalars, images = self.task.validate(batches)
            images = {f"val/{k}": v[: max(1, self.cfg.log_images) * 2] for k, v in images.items()} \
                if self.cfg.log_images else {}
            self._log({f"val/{k}": v for k, v in scalars.items()}, images)
            logger.info("step %d validation: %s", self.step,
                        ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items())))
        acc.wait_for_everyone()

    # ------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps``; returns ``{"step", "checkpoint", "export"}``."""
        self._setup()
        acc, cfg, task = self.accelerator, self.cfg, self.task
        val_batches = self._validation_batches() if acc.is_main_process else []
        batches = self._batches()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        images_seen, t_last, steps_since = 0, time.perf_counter(), 0
        undecodable_logged = 0
        last_ckpt = None
        if self.step >= cfg.max_steps:
            logger.info("step %d ≥ max_steps %d: nothing to train", self.step, cfg.max_steps)
        while self.step < cfg.max_steps:
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                sync = micro == cfg.grad_accum - 1
                with contextlib.ExitStack() as stack:
                    if not sync:
                        for m in task.ddp_modules():
                            stack.enter_context(acc.no_sync(m))
                    scalars = task.train_micro_step(batch, self.step, 1.0 / cfg.grad_accum)
                for k, v in scalars.items():
                    if math.isfinite(v):
                        sums[k] += v
                        counts[k] += 1
                    else:
                        raise TrainingDivergedError(
                            f"step {self.step}: {k} is {v}; the run diverged (try a lower optim.lr or "
                            f"train.mixed_precision=no); resume from the last checkpoint after changing the config")
                images_seen += task.batch_images(batch) * acc.num_processes
            task.optimizer_step(self.step)
            self.step += 1
            steps_since += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                dt = time.perf_counter() - t_last
                log = {f"train/{k}": sums[k] / counts[k] for k in sums}
                log.update({f"lr/{k}": v for k, v in task.learning_rates().items()})
                log.update({f"train/{k}": v for k, v in task.pop_interval_stats().items()})
                log["perf/images_per_s"] = images_seen / max(dt, 1e-9)
                log["perf/s_per_step"] = dt / max(steps_since, 1)
                log["perf/epoch"] = float(self.epoch)
                undecodable = self.undecodable_images()
                log["data/undecodable_images"] = float(undecodable)
                if undecodable > undecodable_logged and acc.is_main_process:
                    logger.warning("%d undecodable training image(s) skipped so far (each replaced by another "
                                   "image; the warnings above name them)", undecodable)
                undecodable_logged = undecodable
                self._log(log)
                if acc.is_main_process:
                    logger.info("step %d/%d %s", self.step, cfg.max_steps, ", ".join(
                        f"{k.split('/', 1)[1]} {v:.4g}" for k, v in log.items() if k.startswith("train/")))
                sums.clear()
                counts.clear()
                images_seen, t_last, steps_since = 0, time.perf_counter(), 0
            if cfg.val_every and self.step % cfg.val_every == 0 and self.step < cfg.max_steps:
                self._validate(val_batches)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                last_ckpt = self.save()
        if self.step == cfg.max_steps and last_ckpt is None:
            last_ckpt = self.resumed_from  # resumed at max_steps: validated at start, not re-hashed
        self._validate(val_batches)
        exported: list[Path] = []
        if acc.is_main_process:
            exported = task.export(self.run_dir / "export")
            self._writer.close()
        undecodable = self.undecodable_images()
        acc.wait_for_everyone()
        return {"step": self.step, "checkpoint": last_ckpt, "export": exported, "undecodable_images": undecodable}


def _reraised_from_workers(loader: DataLoader) -> Iterator[Any]:
    """Iterate ``loader``; an :class:`OSDFaceError` re-raised from a worker process keeps only its own message.

    PyTorch re-raises a worker's exception with the worker's whole traceback in the message
    ("Caught ImageError in DataLoader worker process 0. Original Traceback ..."); the command line
    reports one line.
    """
    try:
        yield from loader
    except OSDFaceError as e:
        text = str(e)
        if not text.startswith("Caught ") or "Original Traceback" not in text:
            raise
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
        raise type(e)(last[len(prefix):] if last.startswith(prefix) else last) from None
