#!/usr/bin/env bash
# Set up (if needed) and run the default test suite: CPU only, tiny models, no network.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The report's browser test drives Debian's chromium (Playwright's own browser downloads are
# not reachable from our machines). Install it when missing and we may (root in CI).
if ! command -v chromium >/dev/null 2>&1; then
  as_root=""
  [ "$(id -u)" = 0 ] || as_root="sudo -n"
  echo "[test] installing chromium for the report's browser test" >&2
  $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium >/dev/null
fi
# Under this script a missing browser fails the browser test instead of skipping it.
export ATP_RAY_REQUIRE_BROWSER=1
exec "${ATP_RAY_VENV:-.venv}/bin/python" -m pytest --timeout=900 "$@"
