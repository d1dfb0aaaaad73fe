"""What a Ray cluster can hold: the node types it can scale to, not only the nodes up now.

A cluster that ``ray up`` starts has no GPU node until a trial asks for one (``min_workers:
0``). Checking a trial against the nodes up now refuses every GPU trial before the autoscaler
sees a demand; checking it against the node types lets the trial wait (its placement group
pending) while the autoscaler adds nodes, and refuses only what no node type could ever hold.

The node types come, in order, from the autoscaler's cluster config in Ray's GCS (published
by autoscaler v2), the autoscaling YAML the head was started with
(``$ATP_RAY_AUTOSCALING_CONFIG``, else ``~/ray_bootstrap_config.yaml``, where ``ray up``
writes it), or else the nodes alive now (a static cluster or a laptop). The arithmetic
(:func:`worker_slots`, :func:`fit_problem`, :func:`trials_at_once`) is plain Python over
:class:`NodeType` lists, testable without Ray.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

AUTOSCALING_CONFIG_ENV = "ATP_RAY_AUTOSCALING_CONFIG"
DEFAULT_AUTOSCALING_CONFIG = "~/ray_bootstrap_config.yaml"
# Ray's bookkeeping resources, not capacity anyone asks for by amount.
_IGNORED = ("memory", "object_store_memory", "node:")


@dataclass(frozen=True)
class NodeType:
    """One kind of node and how many of it the cluster can have at most."""

    name: str
    resources: dict[str, float]
    max_count: int

    def slots(self, bundle: dict[str, float]) -> int:
        """How many ``bundle``-sized workers one node of this type holds."""
        per_node = [
            math.floor(self.resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0
        ]
        return min(per_node) if per_node else 0


def worker_slots(node_types: list[NodeType], bundle: dict[str, float]) -> int:
    """Workers of size ``bundle`` the whole cluster holds at its largest."""
    return sum(t.max_count * t.slots(bundle) for t in node_types)


def fit_problem(node_types: list[NodeType], bundle: dict[str, float], workers: int) -> str | None:
    """Why ``workers`` x ``bundle`` can never run on this cluster, or None when it can (now or once scaled)."""
    asked = ", ".join(f"{v:g} {k}" for k, v in bundle.items() if v > 0)
    if not any(t.slots(bundle) for t in node_types):
        kinds = "; ".join(f"{t.name}: {_describe(t.resources)}" for t in node_types) or "none"
        return f"a worker asks for {asked} and no node type of the cluster holds that (node types: {kinds})"
    slots = worker_slots(node_types, bundle)
    if slots < workers:
        return f"{workers} workers x ({asked}) need {workers} worker slots; the cluster holds {slots} at its largest"
    return None


def trials_at_once(node_types: list[NodeType], bundle: dict[str, float], workers: int) -> int:
    """Trials of ``workers`` x ``bundle`` the cluster can run at once at its largest (at least 1)."""
    return max(1, worker_slots(node_types, bundle) // workers)


def node_cpus(node_types: list[NodeType]) -> list[float]:
    """The CPUs of every node the cluster can have (one entry per node)."""
    return [t.resources.get("CPU", 0.0) for t in node_types for _ in range(t.max_count)]


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


# -- reading them off a running cluster ----------------------------------------------------------


def cluster_node_types() -> list[NodeType]:
    """The node types of the Ray cluster this process is connected to (see the module docstring)."""
    return _from_gcs() or _from_autoscaling_yaml() or _alive_nodes()


def _from_gcs() -> list[NodeType]:
    from ray._private.state import state  # the source Ray Train's own capacity check reads

    try:
        config = state.get_cluster_config()
    except Exception as err:  # an older GCS without the autoscaler state service
        log.debug("no cluster config in the GCS: %s", err)
        return []
    if config is None:
        return []
    return [
        NodeType(group.name, _clean(dict(group.resources)), group.max_count if group.max_count >= 0 else 10**6)
        for group in config.node_group_configs
    ]


def autoscaling_yaml() -> Path | None:
    """The autoscaling YAML to read: ``$ATP_RAY_AUTOSCALING_CONFIG``, else ``ray up``'s copy on the head."""
    path = Path(os.environ.get(AUTOSCALING_CONFIG_ENV) or DEFAULT_AUTOSCALING_CONFIG).expanduser()
    return path if path.is_file() else None


def node_types_of(config: dict[str, Any]) -> list[NodeType]:
    """Node types of an autoscaler config (a ``ray up`` YAML): the head once, workers up to max_workers."""
    head = config.get("head_node_type")
    types = []
    for name, node_type in config.get("available_node_types", {}).items():
        count = 1 if name == head else int(node_type.get("max_workers", config.get("max_workers", 0)))
        types.append(NodeType(name, _clean(node_type.get("resources", {})), count))
    return types


def _from_autoscaling_yaml() -> list[NodeType]:
    path = autoscaling_yaml()
    if path is None:
        return []
    return node_types_of(yaml.safe_load(path.read_text()) or {})


def _alive_nodes() -> list[NodeType]:
    import ray

    return [
        NodeType(node["NodeID"][:8], _clean(node["Resources"]), 1) for node in ray.nodes() if node["Alive"]
    ]


def _clean(resources: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if not k.startswith(_IGNORED)}
