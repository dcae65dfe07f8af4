#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (device tool): GPU tests + the GPU benchmarks.
# Usage on the device: bash benchmarks/gpu_check.sh   (writes JSON/logs under $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu}"
mkdir -p "$OUT"
scripts/setup-venv.sh > "$OUT/setup.log" 2>&1 || { echo "setup failed"; tail -20 "$OUT/setup.log"; exit 1; }
.venv/bin/python -m pytest -m gpu -q tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
.venv/bin/python benchmarks/bench_restore.py --device cuda --dtype fp16 --batch-sizes 1 8 32 --repeats 3 \
  --flops --official-baseline 8 > "$OUT/bench_fp16.json" 2> "$OUT/bench_fp16.err"; tail -3 "$OUT/bench_fp16.err"
.venv/bin/python benchmarks/bench_restore.py --device cuda --dtype fp32 --batch-sizes 1 8 --repeats 3 \
  --official-baseline 4 > "$OUT/bench_fp32.json" 2> "$OUT/bench_fp32.err"; tail -3 "$OUT/bench_fp32.err"
.venv/bin/python benchmarks/bench_restore.py --device cuda --dtype fp16 --batch-sizes 1 8 32 --repeats 3 \
  --overlap-encoders > "$OUT/bench_fp16_overlap.json" 2> "$OUT/bench_fp16_overlap.err"; tail -3 "$OUT/bench_fp16_overlap.err"
cat "$OUT"/bench_*.json
