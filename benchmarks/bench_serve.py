"""Benchmark ``osdface serve``: latency (p50/p99) and throughput with batching on vs off, 1 vs 2 replicas.

Each configuration runs ``osdface serve`` in its own process on 127.0.0.1 (an ephemeral port) so the load
generator does not share its interpreter; ``--clients`` concurrent clients send ``--requests`` requests
each (a fixed count: the run stops by itself), after a warm-up. Two workloads: ``photo`` (the bundled
sample photo: detection, alignment, one face, paste-back) and ``aligned`` (a 64-px face crop: model only).

By default the model is the tiny seeded one (``osdface.testing``): its figures measure the service (HTTP,
decoding, face layer, batching) more than the network — a real model's faces cost far more, which is
where batching and replicas pay. Pass ``--model DIR`` to measure a real folder. Results go to
``benchmarks/results/serve-<tag>.json`` with the machine and its load average before and after.

    .venv/bin/python benchmarks/bench_serve.py                       # tiny model, 4 configurations
    .venv/bin/python benchmarks/bench_serve.py --model ~/.cache/osdface/model --clients 8 --requests 4
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "astronaut.jpg"
CONFIGS = [  # (name, max_batch, batch_wait_ms, replicas)
    ("batching-off_1-replica", 1, 0, 1),
    ("batching-on_1-replica", 8, 20, 1),
    ("batching-off_2-replicas", 1, 0, 2),
    ("batching-on_2-replicas", 8, 20, 2),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(folder: Path) -> Path:
    from osdface.pipelines import OSDFacePipeline
    from osdface.testing import TINY_VRE_CONFIG, write_official_layout

    base, weights = write_official_layout(folder / "official", seed=0)
    out = folder / "model"
    OSDFacePipeline.from_official(base, weights, vre_config=dict(TINY_VRE_CONFIG)).save_pretrained(out)
    return out


def start_server(model: Path, port: int, max_batch: int, wait_ms: float, replicas: int, max_queue: int,
                 log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "osdface", "serve", "--model", str(model), "--device", "cpu", "--port", str(port),
           "--max-batch", str(max_batch), "--batch-wait-ms", str(wait_ms), "--replicas", str(replicas),
           "--max-queue", str(max_queue), "--timeout", "600"]
    env = {k: v for k, v in os.environ.items() if k != "OSDFACE_API_KEY"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen, limit_s: float = 300) -> None:
    import httpx

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


async def load(url: str, body: bytes, params: dict, clients: int, requests: int) -> dict:
    import httpx

    latencies: list[float] = []
    codes: dict[int, int] = {}

    async def client(http):
        for _ in range(requests):
            t0 = time.perf_counter()
            resp = await http.post("/v1/restore", params=params, content=body)
            dt = time.perf_counter() - t0
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
            if resp.status_code == 200:
                latencies.append(dt)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(p):
        return round(latencies[min(len(latencies) - 1, int(round(p / 100 * (len(latencies) - 1))))], 4)

    return {"requests": clients * requests, "codes": {str(k): v for k, v in sorted(codes.items())},
            "wall_s": round(wall, 3), "requests_per_s": round(codes.get(200, 0) / wall, 2),
            "p50_s": pct(50), "p99_s": pct(99), "mean_s": round(statistics.fmean(latencies), 4)}


def warmup(url: str, body: bytes, params: dict) -> None:
    import httpx

    for _ in range(3):
        httpx.post(f"{url}/v1/restore", params=params, content=body, timeout=600).raise_for_status()


def batch_stats(url: str) -> dict:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    vals = {}
    for line in text.splitlines():
        if line.startswith(("osdface_batch_size_count", "osdface_batch_size_sum")):
            name, value = line.split()
            vals[name] = float(value)
    count = vals.get("osdface_batch_size_count", 0)
    return {"model_calls": int(count), "mean_faces_per_call": round(vals.get("osdface_batch_size_sum", 0) / count, 2)
            if count else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="model folder (default: the tiny seeded model)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--workloads", default="photo,aligned")
    ap.add_argument("--tag", default="tiny-cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    from PIL import Image

    from osdface.testing import synthetic_faces

    crop = io.BytesIO()
    Image.fromarray(synthetic_faces(1, seed=5)[0]).save(crop, format="PNG")
    bodies = {"photo": (SAMPLE.read_bytes(), {}), "aligned": (crop.getvalue(), {"aligned": "true"})}
    result = {"benchmark": "serve", "machine": machine(), "load_before": os.getloadavg(),
              "clients": args.clients, "requests_per_client": args.requests, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        result["model"] = "tiny (osdface.testing, 64-px faces)" if args.model is None else str(args.model)
        for name, max_batch, wait_ms, replicas in CONFIGS:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(model, port, max_batch, wait_ms, replicas, max_queue=4 * args.clients,
                                log=Path(tmp) / f"{name}.log")
            try:
                wait_ready(url, proc)
                for workload in args.workloads.split(","):
                    body, params = bodies[workload]
                    warmup(url, body, params)
                    before = batch_stats(url)
                    run = asyncio.run(load(url, body, params, args.clients, args.requests))
                    after = batch_stats(url)
                    calls = after["model_calls"] - before["model_calls"]
                    run.update(config=name, workload=workload, max_batch=max_batch, batch_wait_ms=wait_ms,
                               replicas=replicas, model_calls=calls,
                               load_avg_1m=os.getloadavg()[0])
                    result["runs"].append(run)
                    print(f"{name:26s} {workload:8s} {run['requests_per_s']:7.2f} req/s  p50 {run['p50_s']:.3f} s  "
                          f"p99 {run['p99_s']:.3f} s  calls {calls}  codes {run['codes']}", file=sys.stderr)
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    result["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve-{args.tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
