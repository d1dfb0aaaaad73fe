#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default, offline, on the CPU:
# ATP on SmolLM2-135M with medical text, then compress the pruned model and evaluate it.
# Extra arguments are config overrides for the ATP run, e.g. atp.sparsity=0.4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bin="${ATP_RAY_VENV:-.venv}/bin"
run="${ATP_RAY_OUT:-runs/embedded}"
if [ -f "$run/summary.json" ]; then
  echo "[demo] $run already holds a finished run; remove it to train again" >&2
else
  "$bin/atp-ray" train --config configs/embedded.yaml --out "$run" "$@"
fi
rm -rf "$run-compressed"  # the demo's own output, rebuilt from the run each time
"$bin/atp-ray" compress "$run" --out "$run-compressed"
"$bin/atp-ray" eval "$run-compressed" --tasks domain-ppl,latency --max-samples 100 --out "$run-compressed/eval.json"
