"""The one-machine autoscaling cluster of ``local_up``: a head with too little for one trial, and
worker nodes that Ray's fake multi-node provider starts while work waits for them.

The default-suite test runs a real ``atp-ray search`` on it (two 2-worker trials: the autoscaler
adds both worker nodes, the trials run at once, every model-sized stage runs on a worker node).
The slow ones submit jobs: ``tests/cluster_job.py`` stands in for the search where only the job
plumbing is under test (same command line, real Ray tasks), and a real search is stopped and
resumed, and resumed again on a new head after the first one is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from atp_ray.cluster import clusters, commands, jobs, local, processes, rest, verbs
from atp_ray.cluster import config as cc
from atp_ray.errors import ClusterError

STAND_IN = commands.JobCommands(program=("python", "tests/cluster_job.py"))
SPACE = "tests/cluster_job.py"  # any file of the checkout: the stand-in only reads it


def _start(root: Path) -> clusters.LocalCluster:
    """A local cluster: a 1-CPU head with the search driver's resource, up to two 2-CPU worker nodes."""
    return local.local_up(root, cpus_per_node=2, max_workers=2)


def _stop(cluster: clusters.LocalCluster) -> None:
    local.local_down(cluster.root)
    # Every process the head's `ray start` began is gone (it ran in a session of its own,
    # and the worker nodes the autoscaler started are its children).
    assert not processes.session_members(cluster.head_pid)


@pytest.fixture(scope="session")
def local_cluster():
    """One autoscaling cluster for the session; a short root under /tmp keeps Ray's socket paths legal."""
    root = Path(tempfile.mkdtemp(prefix="atpc-", dir="/tmp"))
    cluster = _start(root)
    try:
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(root, ignore_errors=True)


def _task_nodes(cluster: clusters.LocalCluster, submission_id: str) -> set[str]:
    """The nodes where a job's tasks and actor tasks ran, from Ray's own state API."""
    job = rest.get_json(f"{cluster.dashboard_url}/api/jobs/{submission_id}", cluster.token_path())["job_id"]
    query = f"detail=1&limit=10000&filter_keys=job_id&filter_predicates=%3D&filter_values={job}"
    tasks = rest.get_json(f"{cluster.dashboard_url}/api/v0/tasks?{query}", cluster.token_path())["data"]["result"]
    return {t["node_id"] for t in tasks["result"] if t.get("node_id")}


def _trials(experiment: Path) -> dict[int, dict]:
    return {r["trial"]: r for r in (json.loads(p.read_text()) for p in (experiment / "trials").glob("trial_*.json"))}


@pytest.mark.slow
def test_job_runs_on_nodes_the_autoscaler_adds_and_its_report_comes_back(local_cluster, tmp_path, monkeypatch):
    """The job plumbing, with the stand-in: four 5 s one-CPU tasks on a head of one CPU."""
    experiment = tmp_path / "exp"
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # set after the head started: only the job can carry it
    command_lines = []
    run = jobs.run
    monkeypatch.setattr(jobs, "run", lambda argv, **kw: command_lines.append(argv) or run(argv, **kw))
    job_id, where = verbs.submit_search(
        local_cluster, SPACE, out=str(experiment), trials=4, overrides=["sleep_s=5"], commands=STAND_IN, wait=True
    )
    assert where == str(experiment)
    assert jobs.job_status(local_cluster, job_id) == "SUCCEEDED"
    assert not any("hf_test" in " ".join(argv) for argv in command_lines), "a secret on a command line"

    trials = _trials(experiment)
    assert sorted(trials) == [0, 1, 2, 3]
    (driver,) = [json.loads(p.read_text()) for p in (experiment / "drivers").glob("*.json")]
    assert list(driver["nodes"]) == [driver["driver_node"]], "the job started on the head alone"
    assert {t["node"] for t in trials.values()} - {driver["driver_node"]}, "trials ran on nodes added for them"
    assert {t["node"] for t in trials.values()} <= _task_nodes(local_cluster, job_id), "Ray's own records agree"
    # The driver asked for the head-only resource, so it ran on the head, which has no GPUs.
    assert driver["hf_token"] == "hf_test"
    head = driver["nodes"][driver["driver_node"]]
    assert head[cc.DRIVER_RESOURCE] == cc.DRIVER_RESOURCE_UNITS and "GPU" not in head

    report = verbs.fetch_report(local_cluster, str(experiment), tmp_path / "fetched", commands=STAND_IN)
    assert {r["trial"] for r in json.loads((report / "report.json").read_text())["trials"]} == {0, 1, 2, 3}


def _tiny_space(tmp_path: Path, model_dir: Path, trials: int) -> Path:
    """Trials of 2 Ray Train workers x 1 CPU on the tiny model: none fits the 1-CPU head."""
    from tests.conftest import tiny_run_config

    base = tiny_run_config(
        model_dir, train={"steps": 4, "log_every": 2, "checkpoint_every": 2, "eval_every": 2, "device": "cpu"}
    )
    base["data"]["max_documents"] = 200
    space = {
        "base": base,
        "knobs": {"atp.sparsity": {"uniform": [0.2, 0.6]}},
        "objectives": [{"name": "quality"}, {"name": "params"}],
        "sampler": {"name": "random", "seed": 0},
        "trials": trials,
        "resources": {"workers": 2, "cpus_per_worker": 1},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _search_env(cluster: clusters.LocalCluster) -> dict[str, str]:
    """A driver on the head: the cluster's address and token, its autoscaling config where ``ray up`` keeps one."""
    return {
        **cluster.env(),
        "RAY_ADDRESS": cluster.address,
        "ATP_RAY_AUTOSCALING_CONFIG": str(cluster.root / "autoscaling.yaml"),
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }


def _state(cluster: clusters.LocalCluster, kind: str, **filters: str) -> list[dict]:
    """Rows of Ray's state API (tasks, actors, nodes) on the cluster's dashboard."""
    query = "detail=1&limit=10000" + "".join(
        f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items()
    )
    return rest.get_json(f"{cluster.dashboard_url}/api/v0/{kind}?{query}", cluster.token_path())["data"]["result"]["result"]


def test_real_search_waits_for_the_autoscaler_and_keeps_models_off_the_head(local_cluster, tiny_model_dir, tmp_path):
    """Two trials of 2 workers x 1 CPU on a 1-CPU head: refused before the autoscaler could act, once.
    Now both trials wait, the autoscaler adds the two 2-CPU nodes, they run at once (concurrency
    from the node types), and every model-sized stage runs on a worker node."""
    out = tmp_path / "exp"
    space = _tiny_space(tmp_path, tiny_model_dir, 2)
    log = (tmp_path / "search.log").open("w")  # a file, not a pipe: nobody reads a pipe while we poll
    search = subprocess.Popen(
        [sys.executable, "-m", "atp_ray.cli", "search", "--space", str(space), "--out", str(out)],
        env=_search_env(local_cluster), stdout=log, stderr=subprocess.STDOUT,
    )
    most_workers = 0  # Ray Train workers alive at once, sampled from Ray's state API while it runs
    deadline = time.monotonic() + 900
    while search.poll() is None and time.monotonic() < deadline:
        alive = _state(local_cluster, "actors", class_name="RayTrainWorker", state="ALIVE")
        most_workers = max(most_workers, len(alive))
        time.sleep(1)
    search.kill()
    search.wait()
    output = (tmp_path / "search.log").read_text()
    assert search.returncode == 0, output[-3000:]
    assert "2 trials, 2 at once" in output
    table = pd.read_csv(out / "report" / "trials.csv")
    assert (table.status == "COMPLETED").all() and len(table) == 2, table.failure_reason.tolist()
    assert most_workers == 4, "the two trials trained at once"

    (head,) = [n["node_id"] for n in _state(local_cluster, "nodes") if n["is_head_node"]]
    workers = _state(local_cluster, "actors", class_name="RayTrainWorker")
    stages = sorted((t for t in _state(local_cluster, "tasks") if t["name"].startswith("atp-ray:")), key=lambda t: t["name"])
    assert len(workers) == 4
    assert [t["name"] for t in stages] == ["atp-ray:final_stage"] * 2 + ["atp-ray:reference_stage"] * 2
    assert all(r["node_id"] != head for r in workers + stages), "a model was loaded on the head"


@pytest.mark.slow
def test_stopped_search_resumes_to_completion_without_losing_trials(local_cluster, tmp_path):
    """Measured here: 55-90 s (four jobs on the session's cluster)."""
    experiment = tmp_path / "exp"
    job_id, _ = verbs.submit_search(
        local_cluster, SPACE, out=str(experiment), trials=12, overrides=["sleep_s=6"], commands=STAND_IN
    )
    deadline = time.monotonic() + 120
    while not (experiment / "trials").exists() or not _trials(experiment):
        assert time.monotonic() < deadline, "no trial finished"
        assert jobs.job_status(local_cluster, job_id) in ("PENDING", "RUNNING")
        time.sleep(0.5)
    jobs.stop_job(local_cluster, job_id)
    assert jobs.wait_for_job(local_cluster, job_id, timeout_s=60) == "STOPPED"
    before = _trials(experiment)
    assert 0 < len(before) < 12, "the job was stopped mid-search"

    resumed = verbs.resume_search(local_cluster, str(experiment), commands=STAND_IN, wait=True)
    assert jobs.job_status(local_cluster, resumed) == "SUCCEEDED"
    after = _trials(experiment)
    assert sorted(after) == list(range(12)), "no trial lost"
    assert all(after[i] == before[i] for i in before), "finished trials were not run again"

    model = verbs.export_model(local_cluster, str(experiment), "3", tmp_path / "model", commands=STAND_IN)
    assert json.loads((model / "model.json").read_text())["trial"] == 3


@pytest.mark.slow
def test_real_search_job_stopped_and_resumed(local_cluster, tmp_path):
    """``atp-ray search`` on search_spaces/demo.yaml as a job: stopped mid-search, resumed, reported."""
    experiment = tmp_path / "demo"
    # The demo space, cut to two short trials so that stop, resume and report fit the test's time.
    short = ["train.steps=6", "train.eval_every=3", "train.checkpoint_every=3", "data.max_documents=300"]
    job_id, _ = verbs.submit_search(local_cluster, "search_spaces/demo.yaml", out=str(experiment), trials=2, overrides=short)
    deadline = time.monotonic() + 1200
    while not any(experiment.glob("**/result.json")):  # Tune writes it when a trial first reports
        assert time.monotonic() < deadline and jobs.job_status(local_cluster, job_id) in ("PENDING", "RUNNING")
        time.sleep(2)
    jobs.stop_job(local_cluster, job_id)
    assert jobs.wait_for_job(local_cluster, job_id, timeout_s=120) == "STOPPED"
    resumed = verbs.resume_search(local_cluster, str(experiment), wait=True)
    assert len(_task_nodes(local_cluster, job_id) | _task_nodes(local_cluster, resumed)) == 2, "trials on both nodes"
    report = verbs.fetch_report(local_cluster, str(experiment), tmp_path / "report")
    import pandas as pd

    table = pd.read_csv(report / "trials.csv")  # the budget exactly: none lost, none run twice
    assert len(table) == 2 and table.trial_id.is_unique and (table.status == "COMPLETED").all()


def test_local_cluster_refuses_long_roots_and_missing_state(tmp_path):
    with pytest.raises(ClusterError, match="socket paths"):
        local.local_up("/tmp/" + "x" * 60)
    with pytest.raises(ClusterError, match="no local cluster"):
        clusters.open_cluster(f"local:{tmp_path}")


def test_local_paths_must_be_absolute_on_the_local_cluster(local_cluster):
    with pytest.raises(ClusterError, match="absolute path"):
        verbs.submit_search(local_cluster, SPACE, out="runs/relative", commands=STAND_IN)
    with pytest.raises(ClusterError, match="inside the checkout"):
        verbs.submit_search(local_cluster, "/etc/hostname", out="/tmp/x", commands=STAND_IN)


def _notes(folder: Path) -> Path:
    """A data file of the search's working dir (as one in a job's upload of the checkout)."""
    rows = [json.dumps({"text": f"note {i}: the patient reports symptom {i % 17} since day {i % 5}."}) for i in range(400)]
    (folder / "notes.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "notes.jsonl"


@pytest.mark.slow
def test_search_resumes_on_a_new_head_after_its_head_is_lost(tiny_model_dir, tmp_path):
    """A real search (three 2-worker trials, one at a time) started from working dir A, whose base
    config reads a data file in A. Once trial 1 finished and trial 2 trains, its driver and head
    die together. On a new cluster, from working dir B (A renamed: the lost head's upload is gone),
    ``atp-ray resume`` completes the budget: no trial run twice, none lost, no study trial RUNNING.
    Then ``cluster submit`` on the finished experiment resumes it (a no-op) instead of starting another:
    as that job joins, the worker nodes left from the resume unpack its upload again, under its driver.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from atp_ray.cli import _search_running

    first_dir, second_dir, out = tmp_path / "upload-a", tmp_path / "upload-b", tmp_path / "exp"
    first_dir.mkdir()
    _notes(first_dir)
    space_path = _tiny_space(first_dir, tiny_model_dir, 3)
    space = yaml.safe_load(space_path.read_text())
    space["base"]["data"]["source"] = "file:notes.jsonl"  # relative to the working dir
    space["base"]["train"].update(steps=8, checkpoint_every=2)
    space["concurrency"] = 1
    space_path.write_text(yaml.safe_dump(space))
    trials = out / "trials"

    def status(folder: Path) -> str:
        return json.loads((folder / "trial.json").read_text())["status"]

    def one_done_one_training() -> bool:
        folders = [p.parent for p in trials.glob("*/trial.json")] if trials.is_dir() else []
        done = [f for f in folders if (f / "objectives.json").is_file()]
        training = [f for f in folders if status(f) == "RUNNING"]
        saved = " ".join(p.read_text() for p in (out / "tune").glob("experiment_state-*.json"))
        return bool(done) and any(f.name in saved for f in training)

    roots = [Path(tempfile.mkdtemp(prefix="atpk-", dir="/tmp")) for _ in range(2)]
    first = _start(roots[0])
    second = None
    try:
        log = (tmp_path / "search.log").open("w")
        search = subprocess.Popen(
            [sys.executable, "-m", "atp_ray.cli", "search", "--space", "space.yaml", "--out", str(out)],
            cwd=first_dir,
            env={**_search_env(first), "TUNE_GLOBAL_CHECKPOINT_S": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 900
        while not one_done_one_training():
            assert search.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished while another trained"
            time.sleep(0.5)
        time.sleep(5)  # into trial 2's training (a trial takes about 40 s here)
        # The head is lost, and the driver that ran on it with it.
        search.kill()
        search.wait()
        _stop(first)
        finished = {p.parent.name: p.read_bytes() for p in trials.glob("*/objectives.json")}
        assert 0 < len(finished) < 3
        assert _search_running(out) == (False, None), "the dead driver's driver.pid"
        first_dir.rename(second_dir)

        second = _start(roots[1])
        resume = subprocess.run(
            [sys.executable, "-m", "atp_ray.cli", "resume", str(out)],
            cwd=second_dir, env=_search_env(second), capture_output=True, text=True, timeout=1200,
        )
        assert resume.returncode == 0, (resume.stdout + resume.stderr)[-3000:]
        assert json.loads((out / "search.json").read_text())["workdir"] == str(second_dir)

        table = pd.read_csv(out / "report" / "trials.csv")
        assert len(table) == 3 and table.trial_id.is_unique, table  # the budget, once each
        assert (table.status == "COMPLETED").all(), table.failure_reason.tolist()
        assert sorted(p.name for p in trials.iterdir()) == sorted(table.trial_id)
        assert {name: (trials / name / "objectives.json").read_bytes() for name in finished} == finished
        storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
        states = [t.state.name for t in optuna.load_study(study_name="atp-ray", storage=storage).trials]
        assert "RUNNING" not in states and states.count("COMPLETE") == 3, states

        # Submitting to the same experiment again resumes it: nothing runs, nothing is replaced.
        from atp_ray.search.tuner import holds_resumable_search

        job_id, where = verbs.submit_search(
            second, "search_spaces/demo.yaml", out=str(out), resumable=holds_resumable_search
        )
        assert where == str(out) and job_id.startswith("resume-")
        status = jobs.wait_for_job(second, job_id, timeout_s=600)
        assert sorted(p.name for p in trials.iterdir()) == sorted(table.trial_id)
        assert {name: (trials / name / "objectives.json").read_bytes() for name in finished} == finished
        if status != "SUCCEEDED":
            logs = rest.get_json(f"{second.dashboard_url}/api/jobs/{job_id}/logs", second.token_path())["logs"]
            pytest.fail(f"the resume job failed:\n{logs[-4000:]}")
    finally:
        for cluster in (first, second):
            if cluster is not None and (cluster.root / clusters.LocalCluster.STATE_FILE).exists():
                local.local_down(cluster.root)
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
