"""The rules of a cluster YAML: Ray's own autoscaler schema, checked offline, plus atp-ray's.

atp-ray's rules: a CPU head with the ``search_driver`` resource and no GPUs, one autoscaling
multi-GPU worker type (min 0), Ray token authentication on every node, the dashboard on the
head's 127.0.0.1 only, nothing but SSH open to the world, this checkout installed by
``scripts/bootstrap.sh`` from ``requirements.lock`` (the laptop's versions, Ray included) on
CPython 3.11, ``HF_HOME`` set, and
shared storage for experiments in ``metadata.atp_ray.storage`` (an NFS path that the setup
commands mount on every node, or a bucket URI).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from atp_ray.errors import ClusterError

# The custom resource that only the head node offers: a search's driver (the job's entrypoint)
# asks for one unit, so it lands on the head, next to the trial drivers and away from the GPUs.
DRIVER_RESOURCE = "search_driver"
DRIVER_RESOURCE_UNITS = 1000
# Word marking the values in a shipped cluster YAML that a user must replace.
PLACEHOLDER = "CHANGE-ME"


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """Read a cluster YAML; a missing or non-mapping file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ClusterError(
            f"cluster config not found: {path} (the AWS one is cluster.yaml, the GCP one launch/gcp.yaml)"
        )
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ClusterError(f"{path}: a cluster config is a YAML mapping")
    return config


def ray_schema_problems(config: dict[str, Any]) -> list[str]:
    """Ray's own check of a cluster config, offline: its defaults filled in, then its JSON schema.

    This is what ``ray up`` runs before it contacts the cloud (``prepare_config`` reads the
    provider's ``defaults.yaml`` shipped in the ray package; ``validate_config`` the schema).
    """
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config logs each default it fills in; the user only needs the problems.
    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as err:  # jsonschema.ValidationError, ValueError: Ray's words are the message
        message = getattr(err, "message", None) or str(err)
        where = ".".join(str(p) for p in getattr(err, "absolute_path", []))
        return [f"ray schema: {where + ': ' if where else ''}{message}"]
    return []


def _start_commands(config: dict[str, Any]) -> list[str]:
    return [*config.get("head_start_ray_commands", []), *config.get("worker_start_ray_commands", [])]


def atp_ray_problems(config: dict[str, Any]) -> list[str]:
    """The rules atp-ray's cluster configs keep on top of Ray's schema; one message per broken rule."""
    problems: list[str] = []
    nodes = config.get("available_node_types", {})
    head_name = config.get("head_node_type")
    head = nodes.get(head_name, {})
    head_resources = head.get("resources", {})
    if head_resources.get("GPU", None) != 0:
        problems.append(f"available_node_types.{head_name}.resources.GPU: the head trains nothing, set it to 0")
    if head_resources.get(DRIVER_RESOURCE, 0) < 1:
        problems.append(
            f"available_node_types.{head_name}.resources.{DRIVER_RESOURCE}: the head must offer it "
            f"(e.g. {DRIVER_RESOURCE_UNITS}) so search drivers land there"
        )
    workers = {name: node for name, node in nodes.items() if name != head_name}
    if len(workers) != 1:
        problems.append(f"available_node_types: expected one GPU worker type, got {sorted(workers)}")
    for name, node in workers.items():
        if node.get("resources", {}).get("GPU", 0) < 2:
            problems.append(f"available_node_types.{name}.resources.GPU: a worker is a multi-GPU instance (>= 2)")
        if node.get("min_workers", 0) != 0:
            problems.append(f"available_node_types.{name}.min_workers: must be 0 (GPUs only while a search needs them)")
        if DRIVER_RESOURCE in node.get("resources", {}):
            problems.append(f"available_node_types.{name}.resources: only the head offers {DRIVER_RESOURCE}")

    starts = _start_commands(config)
    ray_starts = [c for c in starts if "ray start" in c]
    head_starts = [c for c in config.get("head_start_ray_commands", []) if "ray start" in c]
    if not all("RAY_AUTH_MODE=token" in c for c in ray_starts) or len(ray_starts) < 2:
        problems.append("head/worker_start_ray_commands: every `ray start` runs with RAY_AUTH_MODE=token")
    if not head_starts or not all("--dashboard-host=127.0.0.1" in c for c in head_starts):
        problems.append(
            "head_start_ray_commands: the dashboard binds --dashboard-host=127.0.0.1 (reach it with `ray dashboard`)"
        )
    if any("0.0.0.0" in c for c in starts):
        problems.append("head/worker_start_ray_commands: nothing may listen on 0.0.0.0")
    token_mounts = [r for r, local in config.get("file_mounts", {}).items() if local == "~/.ray/auth_token"]
    if token_mounts != ["~/.ray/auth_token"]:
        problems.append(
            "file_mounts: must copy ~/.ray/auth_token (this machine's token) to ~/.ray/auth_token on every node"
        )

    for rule in config.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])
        )
        if world and not (rule.get("FromPort") == 22 == rule.get("ToPort")):
            problems.append(
                f"provider.security_group.IpPermissions: only SSH (22) may be open to the world, got {rule}"
            )

    setup = "\n".join(config.get("setup_commands", []))
    mounted_project = [r for r, local in config.get("file_mounts", {}).items() if local == "."]
    if len(mounted_project) != 1:
        problems.append("file_mounts: must copy this checkout ('.') to the nodes, once")
    elif f"cd {mounted_project[0]} && " not in setup or "scripts/bootstrap.sh" not in setup:
        problems.append(
            f"setup_commands: must install the project with `cd {mounted_project[0]} && ... scripts/bootstrap.sh`"
        )
    if "PYTHON=python3.11 " not in setup:
        problems.append(
            "setup_commands: must run scripts/bootstrap.sh with PYTHON=python3.11: requirements.lock, which "
            "pins the nodes' Ray to the job client's, is for CPython 3.11"
        )
    if "torch.cuda.is_available()" not in "\n".join(config.get("worker_setup_commands", [])):
        problems.append(
            "worker_setup_commands: must fail a GPU node whose driver cannot run torch's CUDA "
            "(check torch.cuda.is_available()), or trials would train on no GPU"
        )
    if "HF_HOME=" not in setup:
        problems.append("setup_commands: must export HF_HOME onto the large disk")

    storage = str(config.get("metadata", {}).get("atp_ray", {}).get("storage", ""))
    scheme = {"aws": "s3://", "gcp": "gs://"}.get(config.get("provider", {}).get("type", ""), "")
    mounted = any("mount -t" in c and f" {storage}" in c for c in config.get("setup_commands", []))
    if storage.startswith("/") and not mounted:
        problems.append(f"setup_commands: must mount the shared file system at {storage} on every node")
    elif not storage.startswith("/") and not (scheme and storage.startswith(scheme)):
        problems.append(
            "metadata.atp_ray.storage: experiments live in shared storage, an NFS path mounted on every node "
            f"or a {scheme or 's3:// or gs://'} URI; got {storage!r}"
        )
    return problems


def placeholders(value: Any, where: str = "") -> list[str]:
    """Dotted paths of the values still holding the ``CHANGE-ME`` placeholder."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in placeholders(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in placeholders(v, f"{where}[{i}]")]
    return [where] if PLACEHOLDER in str(value) else []


def check_cluster_config(path: str | Path, *, for_launch: bool) -> dict[str, Any]:
    """Load and check a cluster YAML; every problem is reported at once.

    ``for_launch`` also refuses values a user has yet to fill in (``CHANGE-ME``).
    """
    config = load_cluster_config(path)
    problems = ray_schema_problems(config) + atp_ray_problems(config)
    if for_launch:
        problems += [
            f"{p}: replace the {PLACEHOLDER} placeholder (see the comment above it)" for p in placeholders(config)
        ]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ClusterError(f"{path}: {len(problems)} problem(s):\n{lines}")
    return config
