"""The ``ray`` command line: run one, in the environment ray commands need."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from atp_ray.errors import ClusterError


def run(argv: Sequence[str], env: dict[str, str] | None = None, capture: bool = True, cwd: Path | None = None) -> str:
    """Run a command; a failure raises with the command and the tail of its output.

    Cloud commands run in the checkout, because the cluster YAML mounts '.' onto the nodes.
    """
    result = subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout or "").strip().splitlines()[-25:])
        raise ClusterError(
            f"`{shlex.join(argv)}` failed (exit {result.returncode}){':' + chr(10) + tail if tail else ''}"
        )
    return result.stdout or ""


def base_env() -> dict[str, str]:
    """This environment for ray commands, with token authentication on and no stray cluster address."""
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Nodes started from here find this environment's python, ray and atp-ray first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env
