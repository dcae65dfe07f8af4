"""Training programs: typed experiment configs, the shared accelerate loop, the shared GAN task,
stage 1 (the VRE) and stage 2 (the one-step generator).

``osdface.training.load_config(ExperimentClass, path, overrides)`` parses a YAML experiment;
``train_vre(cfg, data_dirs, run_dir)`` runs one stage-1 phase, ``train_generator(cfg, data_dirs,
run_dir)`` stage 2. Heavy modules load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ConfigError": "config", "DataConfig": "config", "TrainConfig": "config", "load_config": "config",
    "from_dict": "config", "to_dict": "config", "dump_yaml": "config", "apply_overrides": "config",
    "BOUNDS": "config", "Bound": "config", "check_bounds": "config",
    "Trainer": "trainer", "TrainingTask": "trainer", "ShardedEpochSampler": "trainer",
    "RunExistsError": "trainer", "TrainingDivergedError": "trainer",
    "latest_checkpoint": "checkpoint", "resolve_checkpoint": "checkpoint", "validate_checkpoint": "checkpoint",
    "VREExperiment": "vre", "VRETask": "vre", "load_vre_config": "vre", "train_vre": "vre",
    "export_vre": "vre", "write_vre_export": "vre",
    "GANTask": "gan_task", "build_dataset": "gan_task",
    "GeneratorExperiment": "generator_config", "load_generator_config": "generator_config",
    "GeneratorTask": "generator_task", "train_generator": "generator_task",
    "export_generator": "generator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
