#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default, offline, on the CPU:
# a search over ATP's knobs (search_spaces/demo.yaml: six short trials of ATP on SmolLM2-135M
# with medical text, each compressed and evaluated), then the report and its Pareto front.
# Extra arguments are overrides of every trial's run config, e.g. train.steps=16.
# An interrupted demo continues where it stopped (atp-ray resume); remove the folder to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bin="${ATP_RAY_VENV:-.venv}/bin"
experiment="${ATP_RAY_OUT:-experiments/demo}"
if [ -f "$experiment/search.json" ]; then
  echo "[demo] $experiment holds a search already: resuming it" >&2
  "$bin/atp-ray" resume "$experiment"
else
  "$bin/atp-ray" search --space search_spaces/demo.yaml --out "$experiment" "$@"
fi
# search and resume end by writing the report and printing the front; say where it is once more
echo "[demo] report: $experiment/report/report.html   front: $experiment/report/front.csv"
