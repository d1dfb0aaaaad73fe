"""The one-machine cluster: a head and a second Ray node started by ``local_up``, jobs submitted to it.

Search-shaped jobs run ``tests/cluster_job.py`` (same command line as ``atp-ray search``,
real Ray tasks spread over both nodes); the test marked ``real_search`` runs ``atp-ray
search`` itself once that command exists.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from atp_ray import cluster as cl
from atp_ray.errors import ClusterError

STAND_IN = cl.JobCommands(program=("python", "tests/cluster_job.py"))
SPACE = "tests/cluster_job.py"  # any file of the checkout: the stand-in only reads it


@pytest.fixture(scope="session")
def local_cluster():
    """A two-node cluster for the session; a short root under /tmp keeps Ray's socket paths legal."""
    root = Path(tempfile.mkdtemp(prefix="atpc-", dir="/tmp"))
    cluster = cl.local_up(root, cpus_per_node=2)
    try:
        yield cluster
    finally:
        cl.local_down(root)
        shutil.rmtree(root, ignore_errors=True)
    # Every process the two `ray start` commands began is gone (they ran in sessions of their own).
    assert not cl._session_members(cluster.head_pid) and not cl._session_members(cluster.node_pid)


def _task_nodes(cluster: cl.LocalCluster, submission_id: str) -> set[str]:
    """The nodes where a job's tasks and actor tasks ran, from Ray's own state API."""
    job = cl._get_json(f"{cluster.dashboard_url}/api/jobs/{submission_id}", cluster.token_path())["job_id"]
    query = f"detail=1&limit=10000&filter_keys=job_id&filter_predicates=%3D&filter_values={job}"
    tasks = cl._get_json(f"{cluster.dashboard_url}/api/v0/tasks?{query}", cluster.token_path())["data"]["result"]
    return {t["node_id"] for t in tasks["result"] if t.get("node_id")}


def _trials(experiment: Path) -> dict[int, dict]:
    return {r["trial"]: r for r in (json.loads(p.read_text()) for p in (experiment / "trials").glob("trial_*.json"))}


def test_job_runs_on_both_nodes_and_its_report_comes_back(local_cluster, tmp_path, monkeypatch):
    """Measured here: 35-45 s, plus 35-45 s to start the session's two nodes and 8-10 s to stop them."""
    experiment = tmp_path / "exp"
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # set after the nodes started: only the job can carry it
    job_id, where = cl.submit_search(
        local_cluster, SPACE, out=str(experiment), trials=4, overrides=["sleep_s=1"], commands=STAND_IN, wait=True
    )
    assert where == str(experiment)
    assert cl.job_status(local_cluster, job_id) == "SUCCEEDED"

    trials = _trials(experiment)
    assert sorted(trials) == [0, 1, 2, 3]
    (driver,) = [json.loads(p.read_text()) for p in (experiment / "drivers").glob("*.json")]
    assert len(driver["nodes"]) == 2
    assert {t["node"] for t in trials.values()} == set(driver["nodes"]), "trials ran on both nodes"
    assert _task_nodes(local_cluster, job_id) == set(driver["nodes"]), "and Ray's own records agree"
    # The driver asked for the head-only resource, so it ran on the head, which has no GPUs.
    assert driver["hf_token"] == "hf_test"
    head = driver["nodes"][driver["driver_node"]]
    assert head[cl.DRIVER_RESOURCE] == cl.DRIVER_RESOURCE_UNITS and "GPU" not in head

    report = cl.fetch_report(local_cluster, str(experiment), tmp_path / "fetched", commands=STAND_IN)
    assert {r["trial"] for r in json.loads((report / "report.json").read_text())["trials"]} == {0, 1, 2, 3}


@pytest.mark.slow
def test_stopped_search_resumes_to_completion_without_losing_trials(local_cluster, tmp_path):
    """Measured here: 55-90 s (four jobs on the session's cluster)."""
    experiment = tmp_path / "exp"
    job_id, _ = cl.submit_search(
        local_cluster, SPACE, out=str(experiment), trials=12, overrides=["sleep_s=6"], commands=STAND_IN
    )
    deadline = time.monotonic() + 120
    while not (experiment / "trials").exists() or not _trials(experiment):
        assert time.monotonic() < deadline, "no trial finished"
        assert cl.job_status(local_cluster, job_id) in ("PENDING", "RUNNING")
        time.sleep(0.5)
    cl.stop_job(local_cluster, job_id)
    assert cl.wait_for_job(local_cluster, job_id, timeout_s=60) == "STOPPED"
    before = _trials(experiment)
    assert 0 < len(before) < 12, "the job was stopped mid-search"

    resumed = cl.resume_search(local_cluster, str(experiment), commands=STAND_IN, wait=True)
    assert cl.job_status(local_cluster, resumed) == "SUCCEEDED"
    after = _trials(experiment)
    assert sorted(after) == list(range(12)), "no trial lost"
    assert all(after[i] == before[i] for i in before), "finished trials were not run again"

    model = cl.export_model(local_cluster, str(experiment), "3", tmp_path / "model", commands=STAND_IN)
    assert json.loads((model / "model.json").read_text())["trial"] == 3


@pytest.mark.slow
def test_real_search_job_stopped_and_resumed(local_cluster, tmp_path):
    """``atp-ray search`` on search_spaces/demo.yaml as a job: stopped mid-search, resumed, reported."""
    experiment = tmp_path / "demo"
    # The demo space, cut to two short trials so that stop, resume and report fit the test's time.
    short = ["train.steps=6", "train.eval_every=3", "train.checkpoint_every=3", "data.max_documents=300"]
    job_id, _ = cl.submit_search(local_cluster, "search_spaces/demo.yaml", out=str(experiment), trials=2, overrides=short)
    deadline = time.monotonic() + 1200
    while not any(experiment.glob("**/result.json")):  # Tune writes it when a trial first reports
        assert time.monotonic() < deadline and cl.job_status(local_cluster, job_id) in ("PENDING", "RUNNING")
        time.sleep(2)
    cl.stop_job(local_cluster, job_id)
    assert cl.wait_for_job(local_cluster, job_id, timeout_s=120) == "STOPPED"
    resumed = cl.resume_search(local_cluster, str(experiment), wait=True)
    assert len(_task_nodes(local_cluster, job_id) | _task_nodes(local_cluster, resumed)) == 2, "trials on both nodes"
    report = cl.fetch_report(local_cluster, str(experiment), tmp_path / "report")
    import pandas as pd

    table = pd.read_csv(report / "trials.csv")  # the budget exactly: none lost, none run twice
    assert len(table) == 2 and table.trial_id.is_unique and (table.status == "COMPLETED").all()


def test_local_cluster_refuses_long_roots_and_missing_state(tmp_path):
    with pytest.raises(ClusterError, match="socket paths"):
        cl.local_up("/tmp/" + "x" * 60)
    with pytest.raises(ClusterError, match="no local cluster"):
        cl.open_cluster(f"local:{tmp_path}")


def test_local_paths_must_be_absolute_on_the_local_cluster(local_cluster):
    with pytest.raises(ClusterError, match="absolute path"):
        cl.submit_search(local_cluster, SPACE, out="runs/relative", commands=STAND_IN)
    with pytest.raises(ClusterError, match="inside the checkout"):
        cl.submit_search(local_cluster, "/etc/hostname", out="/tmp/x", commands=STAND_IN)
