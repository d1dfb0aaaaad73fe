#!/usr/bin/env bash
# Set up (if needed) and run the default test suite: CPU only, tiny models, no network.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${ATP_RAY_VENV:-.venv}/bin/python" -m pytest --timeout=900 "$@"
