#!/usr/bin/env bash
# Run the test suite (sets up ./.venv first when needed). Extra arguments go to pytest.
#   ./test.sh          the default suite: offline, CPU, about 4 minutes on 2 cores
#   ./test.sh --all    also the slow tests and the network tests (package index + weight cache); what CI runs
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
if [ "${1:-}" = "--all" ]; then
  shift
  exec .venv/bin/python -m pytest -q -m "not gpu" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
