"""Cluster capacity from node types: what fits once the autoscaler scales, on plain lists."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from atp_ray.cluster.capacity import NodeType, fit_problem, node_cpus, node_types_of, trials_at_once, worker_slots

ROOT = Path(__file__).parents[1]


@pytest.fixture
def aws():
    return node_types_of(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


def test_node_types_of_the_shipped_cluster_count_the_head_once_and_workers_to_max(aws):
    by_name = {t.name: t for t in aws}
    assert by_name["head"].max_count == 1 and by_name["head"].resources.get("GPU", 0) == 0
    assert by_name["gpu_worker"].max_count == 4 and by_name["gpu_worker"].resources["GPU"] == 4


def test_a_gpu_trial_fits_a_cluster_with_no_gpu_node_up_yet(aws):
    healthcare = {"CPU": 8, "GPU": 1}  # search_spaces/healthcare.yaml: 4 workers x (8 CPU, 1 GPU)
    assert fit_problem(aws, healthcare, 4) is None
    assert worker_slots(aws, healthcare) == 16  # 4 nodes x min(48 // 8, 4 // 1)
    assert trials_at_once(aws, healthcare, 4) == 4


def test_what_no_node_type_can_hold_is_refused_with_the_node_types_named(aws):
    problem = fit_problem(aws, {"CPU": 1, "GPU": 8}, 1)
    assert "no node type of the cluster holds that" in problem and "gpu_worker: 48 CPU, 4 GPU" in problem
    assert "the cluster holds 4 at its largest" in fit_problem(aws, {"CPU": 1, "GPU": 4}, 5)


def test_slots_are_counted_per_node_not_from_totals():
    # two nodes of 3 CPUs hold two 2-CPU workers, not three (6 CPUs in total would say three)
    nodes = [NodeType("a", {"CPU": 3}, 2)]
    assert worker_slots(nodes, {"CPU": 2}) == 2 and fit_problem(nodes, {"CPU": 2}, 3) is not None
    assert trials_at_once([NodeType("laptop", {"CPU": 2}, 1)], {"CPU": 0.9}, 2) == 1
    assert node_cpus(nodes + [NodeType("b", {"CPU": 8}, 1)]) == [3, 3, 8]
