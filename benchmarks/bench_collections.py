"""Collections (issue 15): photos/s and faces/s of the one-process engine, with and without the overlap
of file work and model, against the Ray engine with 1 and 2 model workers, on this machine.

For each model (the tiny test model; the real-size SD 2.1 / OSDFace architecture with random weights,
:func:`_common.build_random_model_folder`) a tree of astronaut photos (one face each) is restored by:

* ``local-sequential``: :func:`osdface.batch.local.restore_collection` with ``prefetch=0`` (read,
  detect, align, model, paste, write one after the other);
* ``local-overlap``: the same with ``prefetch=8`` (reader and writer threads around the model);
* ``ray-1`` / ``ray-2``: :func:`osdface.batch.ray_engine.restore_collection_ray` on a local Ray
  (``num_cpus`` = the machine's cores), 1 or 2 model actors.

Reported per run: wall seconds, photos/s, faces/s; for the local engine also the model-load time
and the model stage's own time and waiting time (``model_wait_s``: the time the model stage waited
on file work); for Ray the wall time includes the actors' start and model load (that is the cost of
a Ray job). Every run's outputs are compared byte for byte with ``local-sequential``'s. The load
average before and after each run is recorded: the machine is shared.

    .venv/bin/python benchmarks/bench_collections.py                # tiny (24 photos) + real size (2 photos)
    .venv/bin/python benchmarks/bench_collections.py --models tiny
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_random_model_folder, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_tree(root: Path, n: int, side: int) -> Path:
    """``n`` astronaut photos (one face, ``side`` px, light noise) in a nested tree with repeated names."""
    import cv2
    from PIL import Image
    from skimage import data

    face = np.ascontiguousarray(data.astronaut()[0:320, 60:380])
    rng = np.random.default_rng(0)
    if root.exists():
        shutil.rmtree(root)
    for k in range(n):
        d = root / f"album{k % 3}" / f"roll{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
        img = np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"IMG_{k // 6:04d}.jpg", quality=92)
    return root


def tiny_model(path: Path) -> Path:
    from osdface.pipelines import OSDFacePipeline
    from osdface.testing import TINY_VRE_CONFIG, write_official_layout

    if not (path / "model_index.json").is_file():
        layout = write_official_layout(path.parent / "official", seed=0)
        OSDFacePipeline.from_official(*layout, vre_config=dict(TINY_VRE_CONFIG)).save_pretrained(path)
    return path


def cli_args(model: Path, batch_size: int):
    from osdface.cli import build_parser

    return build_parser().parse_args(["restore", "-o", "unused", "--model", str(model), "--device", "cpu",
                                      "--batch-size", str(batch_size)])


def jobs_for(tree: Path, out: Path):
    from osdface.batch.inputs import collect_inputs
    from osdface.batch.stages import PhotoJob

    photos, _ = collect_inputs([tree])
    return [PhotoJob(ph.path, ph.output(out, "png")) for ph in photos]


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def run_local(args, tree: Path, out: Path, prefetch: int) -> dict:
    from osdface.batch.local import restore_collection
    from osdface.cli.common import load_pipeline_from_args
    from osdface.cli.restore_photos import build_restorer

    load0 = time.perf_counter()
    restorer = build_restorer(load_pipeline_from_args(args), args)
    load_s = time.perf_counter() - load0
    jobs = jobs_for(tree, out)
    errors: list[str] = []
    stats = restore_collection(restorer, jobs, functools.partial(_keep_errors, errors), prefetch=prefetch)
    return {**stats.as_dict(), "load_s": load_s, "torch_threads": torch.get_num_threads(), "errors": errors[:3]}


def _keep_errors(errors: list[str], row: dict) -> None:
    if row["error"] is not None:
        errors.append(row["error"])


def run_ray(args, tree: Path, out: Path, workers: int, face_size: int) -> dict:
    import ray

    from osdface.batch.ray_engine import RayStages, restore_collection_ray
    from osdface.cli.restore_photos import face_stage_restorer, model_stage_restorer

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, object_store_memory=1024**3, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        stages = RayStages(face_stage=functools.partial(face_stage_restorer, args, face_size),
                           model_stage=functools.partial(model_stage_restorer, args))
        cpus_per_worker = max(0.5, (cpus - 1) / workers)
        t0 = time.perf_counter()
        errors: list[str] = []
        stats = restore_collection_ray(jobs_for(tree, out), stages, functools.partial(_keep_errors, errors),
                                       workers=workers,
                                       gpus_per_worker=0, cpus_per_worker=cpus_per_worker,
                                       photos_per_call=max(1, args.batch_size))
        total = time.perf_counter() - t0
    finally:
        ray.shutdown()
    d = stats.as_dict()
    d["lost"] = len(d["lost"])
    return {**d, "wall_s": total, "cpus_per_worker": cpus_per_worker, "errors": errors[:3],
            "torch_threads_per_worker": max(1, int(cpus_per_worker))}


def bench_model(name: str, model: Path, n: int, side: int, batch_size: int, runs: list[str], work: Path,
                save=lambda result: None) -> dict:
    from osdface.cli.restore_photos import model_resolution_from_args

    tree = make_tree(work / f"{name}-photos", n, side)
    args = cli_args(model, batch_size)
    face_size = model_resolution_from_args(args)
    result = {"model": name, "photos": n, "photo_side": side, "face_size": face_size, "batch_size": batch_size,
              "runs": {}}
    reference = None
    for run in runs:
        out = work / f"{name}-{run}"
        if out.exists():
            shutil.rmtree(out)
        load_before = os.getloadavg()
        if run.startswith("local"):
            r = run_local(args, tree, out, prefetch=0 if run == "local-sequential" else 8)
        else:
            r = run_ray(args, tree, out, workers=int(run.split("-")[1]), face_size=face_size)
        r["photos_per_s"] = r["photos"] / r["wall_s"]
        r["faces_per_s"] = r["faces"] / r["wall_s"]
        r["loadavg_before"], r["loadavg_after"] = list(load_before), list(os.getloadavg())
        got = files(out)
        if reference is None:
            reference = got
        r["outputs_identical_to_first_run"] = got == reference
        result["runs"][run] = r
        save(result)
        print(json.dumps({"model": name, "run": run, **{k: v for k, v in r.items() if not isinstance(v, list)}}),
              flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tmp = Path(tempfile.gettempdir())
    ap.add_argument("--models", default="tiny,real", help="tiny, real or both (comma-separated)")
    ap.add_argument("--real-model-dir", type=Path, default=tmp / "osdface-bench-sd21-random")
    ap.add_argument("--tiny-photos", type=int, default=24)
    ap.add_argument("--real-photos", type=int, default=2)
    ap.add_argument("--runs", default="local-sequential,local-overlap,ray-1,ray-2")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads of the local engine")
    ap.add_argument("--work", type=Path, default=tmp / "osdface-bench-collections")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "collections-cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    runs = a.runs.split(",")
    results = {"benchmark": "collections", "machine": {**machine(), "loadavg_start": list(os.getloadavg())},
               "note": "local runs use --threads torch threads, each Ray model worker max(1, int(cpus_per_worker)); "
                       "a different thread count can change the last bit of a CPU result, so "
                       "outputs_identical_to_first_run is expected true only between runs with equal thread "
                       "counts (tests/cli/test_restore_collection.py checks identity at one thread everywhere). "
                       "Ray wall_s includes starting the actors and loading the model in each.",
               "models": []}
    def save(result: dict) -> None:  # after every run: an interrupted benchmark keeps what it measured
        done = [m for m in results["models"] if m["model"] != result["model"]] + [result]
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({**results, "models": done}, indent=2) + "\n")

    for name in a.models.split(","):
        if name == "tiny":
            results["models"].append(bench_model("tiny", tiny_model(a.work / "tiny" / "model"), a.tiny_photos, 192,
                                                 4, runs, a.work, save))
        elif name == "real":
            results["models"].append(bench_model("real-size-random", build_random_model_folder(a.real_model_dir),
                                                 a.real_photos, 512, 1, runs, a.work, save))
        else:
            raise SystemExit(f"--models: unknown {name!r}")
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
