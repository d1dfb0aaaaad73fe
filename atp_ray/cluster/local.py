"""A cluster on this machine: a head (the search driver's node) and worker nodes that Ray's
autoscaler starts and stops as processes here, through its fake multi-node provider."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from atp_ray.cluster.capacity import AUTOSCALING_CONFIG_ENV
from atp_ray.cluster.clusters import DEFAULT_LOCAL_ROOT, LocalCluster
from atp_ray.cluster.config import DRIVER_RESOURCE, DRIVER_RESOURCE_UNITS
from atp_ray.cluster.prerequisites import ray_cli, require_job_api
from atp_ray.cluster.processes import free_ports, is_node_leader, start_node, stop_session
from atp_ray.errors import ClusterError

# Ray keeps unix sockets under a node's temp dir; their paths must stay under 107 bytes.
MAX_LOCAL_ROOT_CHARS = 40
LOCAL_HEAD_TYPE = "ray.head.default"  # the name Ray's fake multi-node provider gives the head
LOCAL_WORKER_TYPE = "worker"
LOCAL_IDLE_MINUTES = 1.0  # an idle local worker node stops after this


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
    ports = free_ports(9)
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
    cluster.head_pid = start_node(head, root / "head.log", env, timeout_s)
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
    if is_node_leader(cluster.head_pid):
        stop_session(cluster.head_pid)
    (cluster.root / LocalCluster.STATE_FILE).unlink()
    print(f"local cluster in {cluster.root} stopped")
