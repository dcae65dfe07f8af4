#!/usr/bin/env bash
# Restore the bundled sample photo into outputs/sample/ (sets up ./.venv first when needed).
# Weights: $OSDFACE_HOME (default ~/.cache/osdface), or pass --model DIR / --base-model SD --weights DIR.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
exec .venv/bin/osdface restore assets/astronaut.jpg -o outputs/sample --report outputs/sample/report.json --overwrite "$@"
