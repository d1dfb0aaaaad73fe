"""Searches on a Ray cluster: a cloud one described by ``cluster.yaml``, or two Ray nodes on this machine.

``atp-ray cluster VERB``: ``up``, ``submit``, ``resume``, ``report``, ``export`` and ``down``
drive a cloud cluster through the ``ray`` command line (``ray up``, ``ray job submit``,
``ray rsync-down``, ``ray down``); ``local-up`` and ``local-down`` start and stop a two-node
cluster on this machine that the same verbs reach with ``--cluster local``.

A search is a Ray job: ``ray job submit --working-dir <this checkout> -- atp-ray search ...``.
Its driver runs on the head node (it asks for the ``search_driver`` resource, which only the
head offers); the job's command is built by a :class:`JobCommands`, so a stand-in program
with the same command line can take the search's place (the tests do).

Every verb checks its prerequisites before anything starts and names what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from atp_ray.cluster_capacity import AUTOSCALING_CONFIG_ENV
from atp_ray.cluster_config import DRIVER_RESOURCE, DRIVER_RESOURCE_UNITS, check_cluster_config, load_cluster_config
from atp_ray.errors import ClusterError

# Passed from this shell to the job when set.
FORWARDED_ENV = ("HF_TOKEN",)
# Never uploaded with a job: virtual environments, run outputs, git history.
WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", "models", ".cache", "__pycache__"]
# Ray keeps unix sockets under a node's temp dir; their paths must stay under 107 bytes.
MAX_LOCAL_ROOT_CHARS = 40
DEFAULT_LOCAL_ROOT = "/tmp/atp-ray-local"
LOCAL_HEAD_TYPE = "ray.head.default"  # the name Ray's fake multi-node provider gives the head
LOCAL_WORKER_TYPE = "worker"
LOCAL_IDLE_MINUTES = 1.0  # an idle local worker node stops after this
DASHBOARD_PORT = 8265
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


# -- the job's command ------------------------------------------------------------------------


@dataclass(frozen=True)
class JobCommands:
    """The command lines of the jobs the verbs submit: ``atp-ray``'s own unless told otherwise.

    ``program`` is the command that takes the subcommands ``search``, ``resume``, ``report``
    and ``export`` with atp-ray's arguments (e.g. ``("python", "tests/cluster_job.py")``).
    """

    program: tuple[str, ...] = ("atp-ray",)

    def search(self, space: str, out: str, trials: int | None, overrides: Sequence[str]) -> list[str]:
        trial_args = ["--trials", str(trials)] if trials is not None else []
        return [*self.program, "search", "--space", space, "--out", out, *trial_args, *overrides]

    def resume(self, experiment: str, retry_failed: bool) -> list[str]:
        return [*self.program, "resume", experiment, *(["--retry-failed"] if retry_failed else [])]

    def report(self, experiment: str) -> list[str]:
        return [*self.program, "report", experiment]

    def export(self, experiment: str, trial: str, out: str) -> list[str]:
        return [*self.program, "export", experiment, "--trial", trial, "--out", out]


# -- prerequisites ----------------------------------------------------------------------------


def project_root() -> Path:
    """The atp-ray checkout that jobs upload as their working dir."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ClusterError(
            f"jobs upload the atp-ray checkout, but {root} is not one (no pyproject.toml): run from a git clone"
        )
    return root


def ray_cli() -> str:
    """The ``ray`` command of this Python environment (or of PATH)."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise ClusterError(
            "the `ray` command is not installed: pip install 'atp-ray[cluster]' (it brings ray[default])"
        )
    return found


def require_job_api() -> None:
    """Job submission talks to the Ray dashboard, which needs ray's ``default`` extra."""
    import importlib.util

    missing = [m for m in ("aiohttp", "aiohttp_cors", "opencensus") if importlib.util.find_spec(m) is None]
    if missing:
        raise ClusterError(
            f"Ray job submission needs the dashboard, whose packages are missing ({', '.join(missing)}): "
            "pip install 'atp-ray[cluster]'"
        )


def require_cloud_credentials(provider: str) -> None:
    """Fail early when ``ray up``/``ray down`` could not reach the provider's API."""
    import importlib.util

    if provider == "aws":
        if importlib.util.find_spec("boto3") is None:
            raise ClusterError("provider aws: `ray up` needs boto3 on this machine: pip install boto3")
        import boto3

        if boto3.session.Session().get_credentials() is None:
            raise ClusterError(
                "provider aws: no AWS credentials found (run `aws configure`, or set AWS_PROFILE "
                "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            )
    elif provider == "gcp":
        if importlib.util.find_spec("googleapiclient") is None or importlib.util.find_spec("google.auth") is None:
            raise ClusterError(
                "provider gcp: `ray up` needs google-api-python-client: pip install google-api-python-client"
            )
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            google.auth.default()
        except DefaultCredentialsError as err:
            raise ClusterError(
                f"provider gcp: no Google credentials found ({err}); run `gcloud auth application-default login`"
            ) from None
    else:
        raise ClusterError(f"provider.type: atp-ray ships configs for aws and gcp, got {provider!r}")


def _is_uri(path: str) -> bool:
    return "://" in path


# -- where jobs go: a cloud cluster or a local one --------------------------------------------


def _run(argv: Sequence[str], env: dict[str, str] | None = None, capture: bool = True, cwd: Path | None = None) -> str:
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


def _base_env() -> dict[str, str]:
    """This environment for ray commands, with token authentication on and no stray cluster address."""
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Nodes started from here find this environment's python, ray and atp-ray first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class CloudCluster:
    """A cluster that ``ray up`` started from a cluster YAML; its dashboard is reached over SSH."""

    config_path: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> CloudCluster:
        return cls(Path(path), check_cluster_config(path, for_launch=True))

    @property
    def name(self) -> str:
        return str(self.config.get("cluster_name", "default"))

    @property
    def storage(self) -> str:
        return str(self.config["metadata"]["atp_ray"]["storage"]).rstrip("/")

    def token_path(self) -> Path:
        return Path.home() / ".ray" / "auth_token"

    def env(self) -> dict[str, str]:
        env = _base_env()
        env.pop("RAY_AUTH_TOKEN_PATH", None)  # the token that file_mounts copied to the nodes
        return env

    def default_experiment_root(self) -> str:
        return f"{self.storage}/experiments"

    def check_shared(self, path: str) -> None:
        """Experiments must be readable by every node: under the NFS storage path, or a bucket URI."""
        if _is_uri(path) or (self.storage.startswith("/") and Path(path).is_relative_to(self.storage)):
            return
        raise ClusterError(
            f"{path!r} is a local path, but the cluster has several nodes that must all read the experiment: "
            f"put it under the shared storage of {self.config_path} ({self.storage}/...)"
        )

    @contextlib.contextmanager
    def job_api(self) -> Iterator[str]:
        """The dashboard's address on this machine, through a ``ray dashboard`` SSH port-forward.

        The forward gets a free port of its own: whatever answers on 8265 here may be another
        Ray (a local one, another cluster's forward), and a search must not go there.
        """
        import tempfile

        (port,) = _free_ports(1)
        address = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryFile("w+") as log:
            forward = subprocess.Popen(
                [ray_cli(), "dashboard", str(self.config_path.resolve()), "--port", str(port)],
                env=self.env(),
                cwd=project_root(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                deadline = time.monotonic() + 90
                while not _answers(address, self.token_path()):
                    if forward.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = "\n".join(log.read().strip().splitlines()[-5:])
                        raise ClusterError(
                            f"cannot reach the head's dashboard through `ray dashboard {self.config_path}`: "
                            f"is the cluster up (`atp-ray cluster up --cluster {self.config_path}`)?\n{tail}"
                        )
                    time.sleep(1)
                yield address
            finally:
                _stop_session(forward.pid)

    def fetch(self, remote: str, local: Path) -> None:
        """Copy a folder from the cluster: from the bucket when it is a URI, else from the head."""
        if _is_uri(remote):
            _copy_from_uri(remote, local)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                ray_cli(),
                "rsync-down",
                str(self.config_path.resolve()),
                remote.rstrip("/") + "/",
                str(local.resolve()),
            ]
            _run(argv, env=self.env(), capture=False, cwd=project_root())

    def export_staging(self, name: str) -> str:
        """Where an export job writes a model on the head before it is fetched."""
        return f"/tmp/atp-ray-exports/{name}"

    def follow_hint(self, job_id: str) -> str:
        return (
            f"  keep a port-forward to the head open in another terminal:  ray dashboard {self.config_path}\n"
            f"  then follow the job:  RAY_AUTH_MODE=token ray job logs -f {job_id} "
            f"--address http://127.0.0.1:{DASHBOARD_PORT}\n"
            f"  dashboard: http://127.0.0.1:{DASHBOARD_PORT} (its token: `ray get-auth-token`)"
        )


@dataclass
class LocalCluster:
    """An autoscaling cluster on this machine: a head, and worker nodes started on demand."""

    root: Path
    gcs_port: int
    dashboard_port: int
    head_pid: int

    @property
    def name(self) -> str:
        return f"local ({self.root})"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def token_path(self) -> Path:
        return self.root / "auth_token"

    def env(self) -> dict[str, str]:
        env = _base_env()
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path())
        return env

    def default_experiment_root(self) -> str:
        return str(Path.cwd().resolve() / "runs" / "cluster")

    def check_shared(self, path: str) -> None:
        """Both nodes share this machine's file system; a path only has to be absolute."""
        if not _is_uri(path) and not Path(path).is_absolute():
            raise ClusterError(
                f"{path!r}: give the experiment an absolute path (the job runs in a copy of the checkout)"
            )

    @contextlib.contextmanager
    def job_api(self) -> Iterator[str]:
        if not _answers(self.dashboard_url, self.token_path()):
            raise ClusterError(
                f"the local cluster in {self.root} does not answer: start it with `atp-ray cluster local-up`"
            )
        yield self.dashboard_url

    def fetch(self, remote: str, local: Path) -> None:
        if _is_uri(remote):
            _copy_from_uri(remote, local)
        elif Path(remote).resolve() != local.resolve():
            shutil.copytree(remote, local, dirs_exist_ok=True)

    def export_staging(self, name: str) -> str:
        return str(self.root / "exports" / name)

    def follow_hint(self, job_id: str) -> str:
        return (
            f"  follow the job:  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={self.token_path()} "
            f"ray job logs -f {job_id} --address {self.dashboard_url}\n"
            f"  dashboard: {self.dashboard_url} (its token is in {self.token_path()})"
        )

    # -- its life cycle

    STATE_FILE = "cluster.json"

    @classmethod
    def load(cls, root: str | Path) -> LocalCluster:
        state = Path(root) / cls.STATE_FILE
        if not state.is_file():
            raise ClusterError(f"no local cluster in {root}: start one with `atp-ray cluster local-up --root {root}`")
        return cls(root=Path(root), **{k: v for k, v in json.loads(state.read_text()).items() if k != "root"})

    def save(self) -> None:
        (self.root / self.STATE_FILE).write_text(json.dumps({**asdict(self), "root": str(self.root)}, indent=2))


Cluster = CloudCluster | LocalCluster


def open_cluster(spec: str) -> Cluster:
    """``local`` or ``local:ROOT`` for a cluster on this machine, else the path of a cluster YAML."""
    if spec == "local" or spec.startswith("local:"):
        root = spec.partition(":")[2] or os.environ.get("ATP_RAY_LOCAL_CLUSTER", DEFAULT_LOCAL_ROOT)
        return LocalCluster.load(root)
    return CloudCluster.open(spec)


def _answers(address: str, token_path: Path) -> bool:
    """Does a Ray job API answer at ``address`` to our token?"""
    try:
        _get_json(f"{address}/api/version", token_path, timeout=3)
        return True
    except (OSError, ClusterError):
        return False


def _get_json(url: str, token_path: Path, timeout: float = 10) -> Any:
    token = token_path.read_text().strip() if token_path.is_file() else ""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise ClusterError(f"{url}: HTTP {err.code} {err.reason}") from None


def _post_json(url: str, token_path: Path, timeout: float = 30) -> Any:
    token = token_path.read_text().strip() if token_path.is_file() else ""
    request = urllib.request.Request(url, data=b"", method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        raise ClusterError(f"{url}: HTTP {err.code} {err.reason}") from None


def _copy_from_uri(uri: str, local: Path) -> None:
    """Download a folder from s3:// or gs:// with pyarrow (this machine's cloud credentials)."""
    import pyarrow.fs

    local.mkdir(parents=True, exist_ok=True)
    try:
        pyarrow.fs.copy_files(uri, str(local.resolve()))
    except (OSError, pyarrow.ArrowException) as err:
        raise ClusterError(f"cannot download {uri}: {err}") from None


# -- jobs -------------------------------------------------------------------------------------


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def submit_job(cluster: Cluster, command: Sequence[str], *, job_name: str, wait: bool = False) -> str:
    """Submit ``command`` as a Ray job whose driver runs on the head; returns its submission id.

    The job's working dir is this checkout (minus outputs and environments); ``wait`` blocks
    until the job ends and raises unless it succeeded.
    """
    require_job_api()
    job_id = f"{job_name}-{_stamp()}"
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
        _run([*argv, "--", *command], env=cluster.env())
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
    return str(_get_json(f"{address}/api/jobs/{job_id}", cluster.token_path())["status"])


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
        _post_json(f"{address}/api/jobs/{job_id}/stop", cluster.token_path())


# -- the verbs --------------------------------------------------------------------------------


def _experiment_dir(cluster: Cluster, experiment: str) -> str:
    """An experiment named by its path/URI, or by its bare name under the cluster's experiment root."""
    if _is_uri(experiment) or "/" in experiment:
        return experiment
    return f"{cluster.default_experiment_root()}/{experiment}"


def submit_search(
    cluster: Cluster,
    space: str | Path,
    *,
    out: str | None = None,
    trials: int | None = None,
    overrides: Sequence[str] = (),
    commands: JobCommands = JobCommands(),
    wait: bool = False,
) -> tuple[str, str]:
    """Submit a search as a Ray job; returns (job id, experiment dir).

    An ``out`` that already holds a search with Tune state (one stopped, or whose head was
    lost) is resumed instead, as ``resume`` would (the space, trials and overrides given are
    not used: the experiment keeps its own), so no second search writes into its folder. That
    is checked here when ``out`` is readable from this machine (the local cluster, a mounted
    share); otherwise the job's ``atp-ray search`` refuses the folder and names ``resume``.
    """
    if out is not None and not _is_uri(out) and (Path(out) / "search.json").is_file():
        from ray import tune

        from atp_ray.errors import ATPRayError
        from atp_ray.search.tuner import Experiment

        try:
            resumable = tune.Tuner.can_restore(Experiment.open(out).tune_path)
        except (ATPRayError, OSError, ValueError):  # a damaged search.json, a bucket we lack access to
            resumable = False  # the job's `atp-ray search` says what is wrong
        if resumable:
            print(f"{out} already holds a search: resuming it (its own space and budget) instead of starting another")
            return resume_search(cluster, out, commands=commands, wait=wait), out
    root = project_root()
    space_path = Path(space).resolve()
    if not space_path.is_file():
        raise ClusterError(f"--space: no such file: {space}")
    if not space_path.is_relative_to(root):
        raise ClusterError(f"--space: {space} must lie inside the checkout {root}, which the job uploads")
    experiment = out or f"{cluster.default_experiment_root()}/{space_path.stem}-{_stamp()}"
    cluster.check_shared(experiment)
    command = commands.search(str(space_path.relative_to(root)), experiment, trials, overrides)
    job_id = submit_job(cluster, command, job_name=f"search-{Path(experiment).name}", wait=wait)
    print(f"experiment: {experiment}\n  resume it:  atp-ray cluster resume {experiment} --cluster {_spec(cluster)}")
    return job_id, experiment


def resume_search(
    cluster: Cluster,
    experiment: str,
    *,
    retry_failed: bool = False,
    commands: JobCommands = JobCommands(),
    wait: bool = False,
) -> str:
    """Continue a stopped or crashed search as a new job."""
    experiment = _experiment_dir(cluster, experiment)
    cluster.check_shared(experiment)
    return submit_job(
        cluster, commands.resume(experiment, retry_failed), job_name=f"resume-{Path(experiment).name}", wait=wait
    )


def fetch_report(
    cluster: Cluster, experiment: str, to: Path | None = None, *, commands: JobCommands = JobCommands()
) -> Path:
    """Build the report on the cluster (a job), then copy EXPERIMENT/report/ here."""
    experiment = _experiment_dir(cluster, experiment)
    cluster.check_shared(experiment)
    submit_job(cluster, commands.report(experiment), job_name=f"report-{Path(experiment).name}", wait=True)
    to = to or Path("runs") / "reports" / Path(experiment).name
    cluster.fetch(f"{experiment}/report", to)
    print(f"report: {to}")
    return to


def export_model(
    cluster: Cluster, experiment: str, trial: str, out: Path, *, commands: JobCommands = JobCommands()
) -> Path:
    """Export one trial's compressed model on the cluster (a job), then copy it to ``out`` here."""
    experiment = _experiment_dir(cluster, experiment)
    cluster.check_shared(experiment)
    staging = cluster.export_staging(f"{Path(experiment).name}-{trial}")
    submit_job(
        cluster, commands.export(experiment, trial, staging), job_name=f"export-{Path(experiment).name}", wait=True
    )
    cluster.fetch(staging, out)
    print(f"model: {out}")
    return out


def _spec(cluster: Cluster) -> str:
    return str(cluster.config_path) if isinstance(cluster, CloudCluster) else f"local:{cluster.root}"


def cloud_up(config_path: str | Path, *, yes: bool = False) -> None:
    """Check everything ``ray up`` needs, make sure a token exists, then start the head."""
    ray = ray_cli()
    config = check_cluster_config(config_path, for_launch=True)
    require_cloud_credentials(config["provider"]["type"])
    env = _base_env()
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    # file_mounts copies ~/.ray/auth_token to every node; the job client presents the same token.
    _run([ray, "get-auth-token", "--generate"], env=env)
    _run(
        [ray, "up", str(Path(config_path).resolve()), *(["-y"] if yes else [])],
        env=env,
        capture=False,
        cwd=project_root(),
    )
    print(
        f"cluster {config.get('cluster_name')} is up; search on it with\n"
        f"  atp-ray cluster submit --cluster {config_path} --space search_spaces/<space>.yaml"
    )


def cloud_down(config_path: str | Path, *, yes: bool = False) -> None:
    """Tear the cluster down; experiments in shared storage stay."""
    ray = ray_cli()
    config = load_cluster_config(config_path)
    require_cloud_credentials(config.get("provider", {}).get("type", ""))
    argv = [ray, "down", str(Path(config_path).resolve()), *(["-y"] if yes else [])]
    _run(argv, env=_base_env(), capture=False, cwd=project_root())


# -- the local cluster ------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Ports the OS calls free now (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _node_args(temp_dir: Path, cpus: float, gpus: int, ports: list[int]) -> list[str]:
    """Options every node gets: its own ports (Ray's defaults collide between instances) and temp dir."""
    manager, objects, agent_http, agent_grpc, runtime_env, metrics = ports
    return [
        f"--node-manager-port={manager}",
        f"--object-manager-port={objects}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        f"--num-cpus={cpus:g}",
        f"--num-gpus={gpus}",
        "--object-store-memory=100000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--block",
    ]


def _start_node(argv: list[str], log: Path, env: dict[str, str], timeout_s: float) -> int:
    """Start ``ray start --block`` in its own session; returns its pid once the node is up."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_session(proc.pid)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ClusterError(f"a local Ray node did not start (log {log}):\n{tail}")
        time.sleep(0.5)
    return proc.pid


def _session_members(sid: int) -> list[int]:
    """Processes of session ``sid`` (the session a node's ``ray start`` opened), from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ...
            members.append(int(stat.parent.name))
    return members


def _is_node_leader(pid: int) -> bool:
    """Is ``pid`` still a ``ray start`` that leads its own session (not a reused pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return bool(pid) and bool(_session_members(pid))  # the leader is gone; stragglers may remain
    return os.getsid(pid) == pid and b"start" in cmdline and any(part.endswith(b"ray") for part in cmdline)


def _stop_session(pid: int, grace_s: float = 20) -> None:
    """Stop a process we started in its own session, then anything left in that session.

    ``ray start --block`` shuts its node down on SIGTERM; stragglers (workers, forked
    dashboard modules) share its session id and are killed by pid. Never ``ray stop``:
    that kills every Ray process on the host.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _session_members(pid):
            return
        time.sleep(0.5)
    for member in _session_members(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + 5  # until the killed are reaped (the leader by us, if it is our child)
    while _session_members(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)


def local_autoscaling_config(
    gcs_address: str, *, head_cpus: float, worker_cpus: int, worker_gpus: int, max_workers: int
) -> dict[str, Any]:
    """The autoscaler config of a local cluster: Ray's fake multi-node provider, which starts and
    stops worker nodes as processes on this machine, as a cloud provider starts machines."""
    worker = {"CPU": worker_cpus, **({"GPU": worker_gpus} if worker_gpus else {})}
    empty: dict[str, Any] = {}
    return {
        "cluster_name": "atp-ray-local",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": LOCAL_IDLE_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # new nodes join this head, not Ray's default port
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            LOCAL_HEAD_TYPE: {
                "resources": {"CPU": head_cpus, DRIVER_RESOURCE: DRIVER_RESOURCE_UNITS},
                "node_config": empty,
                "max_workers": 0,
            },
            LOCAL_WORKER_TYPE: {"resources": worker, "node_config": empty, "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": LOCAL_HEAD_TYPE,
        **{key: {} for key in ("docker", "file_mounts")},
        **{
            key: []
            for key in (
                "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
                "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
            )
        },
        "file_mounts_sync_continuously": False,
    }


def local_up(
    root: str | Path = DEFAULT_LOCAL_ROOT,
    *,
    cpus_per_node: int = 2,
    worker_gpus: int = 0,
    max_workers: int = 2,
    head_cpus: float = 1,
    timeout_s: float = 180,
) -> LocalCluster:
    """Start an autoscaling cluster on this machine: a head (the search driver's node, no GPUs)
    and a worker node type (``cpus_per_node`` CPUs, ``worker_gpus`` GPUs) that the autoscaler
    starts, up to ``max_workers`` nodes, while work waits for it, and stops when idle."""
    root = Path(root).absolute()
    if len(str(root)) > MAX_LOCAL_ROOT_CHARS:
        raise ClusterError(
            f"--root: {root} is {len(str(root))} characters; Ray's socket paths under it must stay short, "
            f"use at most {MAX_LOCAL_ROOT_CHARS} (e.g. {DEFAULT_LOCAL_ROOT})"
        )
    if (root / LocalCluster.STATE_FILE).exists():
        raise ClusterError(f"{root} already holds a local cluster: `atp-ray cluster local-down --root {root}` first")
    ray = ray_cli()
    require_job_api()
    root.mkdir(parents=True, exist_ok=True)
    token = root / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    ports = _free_ports(9)
    cluster = LocalCluster(root=root, gcs_port=ports[0], dashboard_port=ports[1], head_pid=0)
    autoscaling = root / "autoscaling.yaml"
    autoscaling.write_text(
        yaml.safe_dump(
            local_autoscaling_config(
                cluster.address, head_cpus=head_cpus, worker_cpus=cpus_per_node, worker_gpus=worker_gpus,
                max_workers=max_workers,
            )
        )
    )
    env = cluster.env() | {"RAY_FAKE_CLUSTER": "1", AUTOSCALING_CONFIG_ENV: str(autoscaling)}
    head = [
        ray,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={cluster.gcs_port}",
        f"--autoscaling-config={autoscaling}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={cluster.dashboard_port}",
        f"--ray-client-server-port={ports[2]}",
        f"--resources={json.dumps({DRIVER_RESOURCE: DRIVER_RESOURCE_UNITS})}",
        *_node_args(root / "h", head_cpus, 0, ports[3:9]),
    ]
    cluster.head_pid = _start_node(head, root / "head.log", env, timeout_s)
    cluster.save()
    print(
        f"local cluster up: head {cluster.address} (pid {cluster.head_pid}); worker nodes of {cpus_per_node} CPUs"
        f"{f', {worker_gpus} GPUs' if worker_gpus else ''} start on demand, up to {max_workers}\n"
        f"  search on it:  atp-ray cluster submit --cluster local:{root} --space search_spaces/demo.yaml\n"
        f"  dashboard: {cluster.dashboard_url} (token in {token})\n"
        f"  stop it:  atp-ray cluster local-down --root {root}"
    )
    return cluster


def local_down(root: str | Path = DEFAULT_LOCAL_ROOT) -> None:
    """Stop the local cluster by its head's pid: the head and every node it started share its session."""
    cluster = LocalCluster.load(root)
    if _is_node_leader(cluster.head_pid):
        _stop_session(cluster.head_pid)
    (cluster.root / LocalCluster.STATE_FILE).unlink()
    print(f"local cluster in {cluster.root} stopped")


# -- the command line -------------------------------------------------------------------------


# One handler per verb; ``atp-ray``'s main calls ``args.handler(args)``.
_HANDLERS = {
    "up": lambda a: cloud_up(a.cluster, yes=a.yes),
    "down": lambda a: cloud_down(a.cluster, yes=a.yes),
    "local-up": lambda a: local_up(
        a.root, cpus_per_node=a.cpus_per_node, worker_gpus=a.worker_gpus, max_workers=a.max_workers
    ),
    "local-down": lambda a: local_down(a.root),
    "submit": lambda a: submit_search(
        open_cluster(a.cluster), a.space, out=a.out, trials=a.trials, overrides=a.overrides, wait=a.wait
    ),
    "resume": lambda a: resume_search(open_cluster(a.cluster), a.experiment, retry_failed=a.retry_failed, wait=a.wait),
    "report": lambda a: fetch_report(open_cluster(a.cluster), a.experiment, Path(a.to) if a.to else None),
    "export": lambda a: export_model(open_cluster(a.cluster), a.experiment, a.trial, Path(a.out)),
}


def add_cluster_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``atp-ray cluster VERB ...`` with the main command."""
    parser = commands.add_parser("cluster", help="run searches on a Ray cluster (cloud or this machine)")
    parser.set_defaults(handler=lambda args: _HANDLERS[args.verb](args))
    verbs = parser.add_subparsers(dest="verb", required=True)
    target = dict(
        default="cluster.yaml", help="cluster YAML (default cluster.yaml), or local[:ROOT] for the local cluster"
    )

    for verb, text in (("up", "start the cloud cluster (ray up)"), ("down", "tear the cloud cluster down (ray down)")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument(
            "--cluster", default="cluster.yaml", help="cluster YAML (default cluster.yaml; GCP: launch/gcp.yaml)"
        )
        p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    p = verbs.add_parser("submit", help="submit a search as a Ray job and print how to follow it")
    p.add_argument("--cluster", **target)
    p.add_argument(
        "--space", required=True, help="search space YAML inside this checkout (e.g. search_spaces/demo.yaml)"
    )
    p.add_argument("--out", help="experiment dir (default: <storage>/experiments/<space>-<time>)")
    p.add_argument("--trials", type=int, help="number of trials")
    p.add_argument("--wait", action="store_true", help="block until the job ends")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides passed to atp-ray search")

    p = verbs.add_parser("resume", help="continue a stopped or crashed search as a new job")
    p.add_argument("experiment", help="experiment dir/URI, or its name under <storage>/experiments")
    p.add_argument("--cluster", **target)
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    p.add_argument("--wait", action="store_true", help="block until the job ends")

    p = verbs.add_parser("report", help="build a search's report on the cluster and copy it here")
    p.add_argument("experiment", help="experiment dir/URI, or its name under <storage>/experiments")
    p.add_argument("--cluster", **target)
    p.add_argument("--to", help="local folder (default runs/reports/<experiment name>)")

    p = verbs.add_parser("export", help="export one trial's compressed model and copy it here")
    p.add_argument("experiment", help="experiment dir/URI, or its name under <storage>/experiments")
    p.add_argument("--cluster", **target)
    p.add_argument("--trial", required=True, help="trial id (from the report)")
    p.add_argument("--out", required=True, help="local folder for the model")

    root_help = (
        f"state and temp dir of the local cluster, at most {MAX_LOCAL_ROOT_CHARS} characters "
        f"(default {DEFAULT_LOCAL_ROOT})"
    )
    p = verbs.add_parser("local-up", help="start an autoscaling Ray cluster on this machine")
    p.add_argument("--root", default=os.environ.get("ATP_RAY_LOCAL_CLUSTER", DEFAULT_LOCAL_ROOT), help=root_help)
    p.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs each worker node offers (default 2)")
    p.add_argument(
        "--worker-gpus", type=int, default=0, help="GPUs each worker node offers (default 0; the head has none)"
    )
    p.add_argument("--max-workers", type=int, default=2, help="worker nodes the autoscaler may start (default 2)")
    p = verbs.add_parser("local-down", help="stop the local cluster's nodes by their pids")
    p.add_argument("--root", default=os.environ.get("ATP_RAY_LOCAL_CLUSTER", DEFAULT_LOCAL_ROOT), help=root_help)
