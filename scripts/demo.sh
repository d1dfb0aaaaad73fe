#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default: ATP on SmolLM2-135M
# with medical text, offline, on the CPU. Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${ATP_RAY_VENV:-.venv}/bin/atp-ray" train --config configs/embedded.yaml --out "${ATP_RAY_OUT:-runs/embedded}" "$@"
