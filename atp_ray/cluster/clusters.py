"""Where jobs go: a cloud cluster that ``ray up`` started from a cluster YAML, or a local one.

Both answer the same questions (its job API's address, its token, where experiments go and
whether a path is shared by its nodes, how to copy a folder back), so the verbs and the job
client never ask which kind they hold."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atp_ray.cluster.config import check_cluster_config
from atp_ray.cluster.prerequisites import project_root, ray_cli
from atp_ray.cluster.processes import free_ports, stop_session
from atp_ray.cluster.rest import answers
from atp_ray.cluster.shell import base_env, run
from atp_ray.errors import ClusterError

DEFAULT_LOCAL_ROOT = "/tmp/atp-ray-local"
DASHBOARD_PORT = 8265


def is_uri(path: str) -> bool:
    """An ``s3://``/``gs://`` location rather than a path of a node's file system."""
    return "://" in path


def _copy_from_uri(uri: str, local: Path) -> None:
    """Download a folder from s3:// or gs:// with pyarrow (this machine's cloud credentials)."""
    import pyarrow.fs

    local.mkdir(parents=True, exist_ok=True)
    try:
        pyarrow.fs.copy_files(uri, str(local.resolve()))
    except (OSError, pyarrow.ArrowException) as err:
        raise ClusterError(f"cannot download {uri}: {err}") from None


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
        env = base_env()
        env.pop("RAY_AUTH_TOKEN_PATH", None)  # the token that file_mounts copied to the nodes
        return env

    def default_experiment_root(self) -> str:
        return f"{self.storage}/experiments"

    def check_shared(self, path: str) -> None:
        """Experiments must be readable by every node: under the NFS storage path, or a bucket URI."""
        if is_uri(path) or (self.storage.startswith("/") and Path(path).is_relative_to(self.storage)):
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
        (port,) = free_ports(1)
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
                while not answers(address, self.token_path()):
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
                stop_session(forward.pid)

    def fetch(self, remote: str, local: Path) -> None:
        """Copy a folder from the cluster: from the bucket when it is a URI, else from the head."""
        if is_uri(remote):
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
            run(argv, env=self.env(), capture=False, cwd=project_root())

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
        env = base_env()
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path())
        return env

    def default_experiment_root(self) -> str:
        return str(Path.cwd().resolve() / "runs" / "cluster")

    def check_shared(self, path: str) -> None:
        """Both nodes share this machine's file system; a path only has to be absolute."""
        if not is_uri(path) and not Path(path).is_absolute():
            raise ClusterError(
                f"{path!r}: give the experiment an absolute path (the job runs in a copy of the checkout)"
            )

    @contextlib.contextmanager
    def job_api(self) -> Iterator[str]:
        if not answers(self.dashboard_url, self.token_path()):
            raise ClusterError(
                f"the local cluster in {self.root} does not answer: start it with `atp-ray cluster local-up`"
            )
        yield self.dashboard_url

    def fetch(self, remote: str, local: Path) -> None:
        if is_uri(remote):
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
