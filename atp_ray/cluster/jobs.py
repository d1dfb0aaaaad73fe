"""Ray jobs on a cluster: submit one (its driver on the head), read its status, wait, stop.

A job's working dir is this checkout, uploaded by Ray; its driver asks for the head's
``search_driver`` resource, so it runs on the head, next to the experiment."""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from atp_ray.cluster.clusters import Cluster
from atp_ray.cluster.config import DRIVER_RESOURCE
from atp_ray.cluster.prerequisites import project_root, ray_cli, require_job_api
from atp_ray.cluster.rest import get_json, post_json
from atp_ray.cluster.shell import run
from atp_ray.errors import ClusterError

# Passed from this shell to the job when set.
FORWARDED_ENV = ("HF_TOKEN",)
# Never uploaded with a job: virtual environments, run outputs, git history.
WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", "models", ".cache", "__pycache__"]
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


def stamp() -> str:
    """The time now (UTC), for job ids and experiment names."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def submit_job(cluster: Cluster, command: Sequence[str], *, job_name: str, wait: bool = False) -> str:
    """Submit ``command`` as a Ray job whose driver runs on the head; returns its submission id.

    The job's working dir is this checkout (minus outputs and environments); ``wait`` blocks
    until the job ends and raises unless it succeeded.
    """
    require_job_api()
    job_id = f"{job_name}-{stamp()}"
    runtime_env: dict[str, Any] = {"working_dir": str(project_root()), "excludes": WORKING_DIR_EXCLUDES}
    # Gated hub models (Llama) need the user's Hugging Face token on the nodes that load them.
    forwarded = {var: os.environ[var] for var in FORWARDED_ENV if var in os.environ}
    if forwarded:
        runtime_env["env_vars"] = forwarded
    # The runtime env goes in a file only we can read: on a command line, a token in it would
    # show in every user's `ps`.
    with cluster.job_api() as address, tempfile.TemporaryDirectory(prefix="atp-job-") as tmp:
        env_file = Path(tmp) / "runtime_env.json"
        env_file.touch(mode=0o600)
        env_file.write_text(json.dumps(runtime_env))
        argv = [ray_cli(), "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait"]
        argv += ["--runtime-env", str(env_file)]
        argv += ["--entrypoint-resources", json.dumps({DRIVER_RESOURCE: 1})]
        run([*argv, "--", *command], env=cluster.env())
        print(f"submitted job {job_id} to {cluster.name}: {shlex.join(command)}\n{cluster.follow_hint(job_id)}")
        if wait:
            status = wait_for_job(cluster, job_id, address=address)
            if status != "SUCCEEDED":
                raise ClusterError(f"job {job_id} ended {status}: see `ray job logs {job_id}`")
    return job_id


def job_status(cluster: Cluster, job_id: str, address: str | None = None) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, from the Ray job API."""
    if address is None:
        with cluster.job_api() as address:
            return job_status(cluster, job_id, address)
    return str(get_json(f"{address}/api/jobs/{job_id}", cluster.token_path())["status"])


def wait_for_job(cluster: Cluster, job_id: str, *, address: str | None = None, timeout_s: float | None = None) -> str:
    """Poll until the job ends; returns its final status."""
    if address is None:
        with cluster.job_api() as address:  # one port-forward for the whole wait
            return wait_for_job(cluster, job_id, address=address, timeout_s=timeout_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (status := job_status(cluster, job_id, address)) not in TERMINAL_JOB_STATES:
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(1)
    return status


def stop_job(cluster: Cluster, job_id: str) -> None:
    """Ask Ray to stop a running job (``ray job stop``'s request); its trials stop with it and the
    experiment stays resumable."""
    with cluster.job_api() as address:
        post_json(f"{address}/api/jobs/{job_id}/stop", cluster.token_path())
