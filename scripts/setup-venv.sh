#!/usr/bin/env bash
# Create or update ./.venv with osdface (editable) and everything the tests need.
# Idempotent: does nothing when pyproject.toml has not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3 python; do
    if command -v "$c" >/dev/null 2>&1; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.osdface-setup-stamp
want="$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip >&2
# The tested torch build (x86_64 Linux, Python 3.11: a local wheel on the dev machines).
# Elsewhere keep whatever torch pip picks for the platform.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch (a few minutes the first time)" >&2
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2 \
    || .venv/bin/python -m pip install -q torch torchvision >&2
fi
echo "setup: installing osdface and its test dependencies" >&2
.venv/bin/python -m pip install -q -e ".[dev,train,face,eval,onnx,openvino,serve,scale]" >&2
echo "$want" > "$stamp"
