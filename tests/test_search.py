"""The search end to end on the tiny model: front, failed and stopped trials, study state, export.

One search of 5 short trials (about a minute on 2 cores) feeds most tests: three ordinary
trials, one seeded with an absurd learning rate (it diverges) and one that the shipped
Pareto early-stopping scheduler stops at its first rung.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from atp_ray.cli import main
from tests.conftest import tiny_run_config
from test_report_browser import browser, dense_stars, front_markers, front_table_ids, open_report  # noqa: F401 (a fixture)



def write_space(tmp_path, model_dir, trials, points=(), steps=6, **extra) -> Path:
    base = tiny_run_config(
        model_dir, train={"steps": steps, "log_every": 2, "checkpoint_every": 2, "eval_every": 2, "device": "cpu"}
    )
    base["data"]["max_documents"] = 200
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    space = {
        "base": "base.yaml",
        "knobs": {
            "atp.sparsity": {"uniform": [0.2, 0.7]},
            "atp.lasso_weight": {"loguniform": [0.001, 0.1]},
            "train.lr": {"choice": [0.001, 1e30]},
        },
        "objectives": [{"name": "quality"}, {"name": "params"}],
        "sampler": {"name": "random", "seed": 3},
        "trials": trials,
        "concurrency": 2,
        "resources": {"cpus_per_worker": 1},
        "points_to_evaluate": list(points),
    }
    space.update(extra)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def dominated(point, others):
    return any(np.all(o <= point) and np.any(o < point) for o in others)


def study_states(experiment: Path) -> list[str]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(experiment / "study.journal")))
    return [t.state.name for t in optuna.load_study(study_name="atp-ray", storage=storage).trials]



# The shipped early-stopping scheduler, with one rung at step 2 (the next, at 8, is past the end).
EARLY_STOPPING = {"enabled": True, "grace": 1, "eta": 4}  # first rung: the first report, step 2


@pytest.fixture(scope="module")
def search(ray_local, tiny_model_dir, tmp_path_factory):
    """The real search, its real early-stopping scheduler included, designed so one stop is certain.

    At step 2 every trial keeps the same parameters and its held-out perplexity depends only on
    the lasso weight (bit for bit: the sparsity target does not act yet), higher being worse.
    The three ordinary trials share lasso 0.01, so at the rung none is ever beaten; the last
    point (lasso 0.1) is dominated by each of them. With two trials at once it starts only
    after three others ended, so at least two completed ones wait at the rung: 2 of 3 beat it,
    more than 1/eta, and it is stopped.
    """
    tmp = tmp_path_factory.mktemp("search")
    points = [
        {"atp.sparsity": 0.3, "atp.lasso_weight": 0.01, "train.lr": 1e30},  # diverges
        {"atp.sparsity": 0.2, "atp.lasso_weight": 0.01, "train.lr": 0.001},  # ends dominated by 0.4
        {"atp.sparsity": 0.4, "atp.lasso_weight": 0.01, "train.lr": 0.001},
        {"atp.sparsity": 0.6, "atp.lasso_weight": 0.01, "train.lr": 0.001},
        {"atp.sparsity": 0.69, "atp.lasso_weight": 0.1, "train.lr": 0.001},  # dominated at step 2: stopped
    ]
    space = write_space(tmp, tiny_model_dir, trials=5, points=points, early_stopping=EARLY_STOPPING)
    out = tmp / "exp"
    assert main(["search", "--space", str(space), "--out", str(out)]) == 0
    return out, pd.read_csv(out / "report" / "trials.csv")


def test_search_runs_the_budget_and_its_front_is_exactly_the_non_dominated_completed_trials(search):
    out, table = search
    assert len(table) == 5 and table["trial_id"].is_unique
    completed = table[table.status == "COMPLETED"]
    assert len(completed) == 3
    values = completed[["obj.quality", "obj.params"]].to_numpy(dtype=float)
    non_dominated = {t for t, v in zip(completed.trial_id, values) if not dominated(v, values)}
    front = pd.read_csv(out / "report" / "front.csv")
    assert set(front.trial_id) == non_dominated and front.trial_id.is_unique  # complete and sound
    assert set(table.trial_id[table.on_front]) == non_dominated  # the table's column says the same
    assert all(Path(p).is_dir() for p in completed.model_path)
    assert (completed.wall_time_s > 0).all()


def test_diverged_trial_is_failed_with_its_reason_and_told_to_optuna(search):
    out, table = search
    failed = table[table.status == "FAILED"]
    assert len(failed) == 1 and failed.iloc[0]["knob.train.lr"] == 1e30
    assert "diverged" in failed.iloc[0].failure_reason
    assert math.isnan(failed.iloc[0]["obj.quality"])
    states = study_states(out)
    assert sorted(states) == ["COMPLETE"] * 3 + ["FAIL", "PRUNED"]


def test_early_stopping_stops_the_dominated_trial_tells_optuna_and_keeps_it_off_the_front(search):
    from atp_ray.search.scheduler import read_stopped

    out, table = search
    stopped = table[table.status == "STOPPED"]
    assert list(stopped["knob.atp.lasso_weight"]) == [0.1]
    trial_id = stopped.trial_id.iloc[0]
    # the shipped scheduler stopped it at the first rung, and did not stop any other trial
    record = read_stopped(out / "early_stopping.jsonl")
    assert set(record) == {trial_id} and (record[trial_id].rung, record[trial_id].step) == (0, 2.0)
    reports = [json.loads(line) for line in (out / "tune" / trial_id / "result.json").read_text().splitlines()]
    assert [r["step"] for r in reports] == [2.0]  # not trained past its first report
    assert not (out / "trials" / trial_id / "objectives.json").exists()
    assert "PRUNED" in study_states(out)  # the one PRUNED study trial (see the test above)
    front = pd.read_csv(out / "report" / "front.csv")
    assert trial_id not in set(front.trial_id) and not stopped.on_front.iloc[0]


def test_the_report_of_a_real_search_draws_its_front_in_chromium(search, browser):
    """The page a user opens after a search: front members drawn as such, the front table listing them."""
    out, table = search
    report = open_report(browser, out / "report" / "report.html")
    front = pd.read_csv(out / "report" / "front.csv").trial_id.tolist()
    completed = table.trial_id[table.status == "COMPLETED"]
    assert 0 < len(front) < len(completed)  # both kinds of marker are on the page
    assert front_markers(report.page) == {t: t in front for t in completed}  # only completed trials are drawn
    assert front_table_ids(report.page) == front
    assert len(dense_stars(report.page)) == 1  # the dense model (dense.json, measured once) on the one panel
    assert report.problems == [] and report.external == []
    report.page.close()


def test_every_trial_logs_to_tensorboard(search):
    out, table = search
    for trial_id in table.trial_id:
        assert list((out / "tune" / trial_id).glob("events.out.tfevents.*")), trial_id


def test_export_hands_over_a_loadable_front_model(search, tmp_path):
    import torch

    from atp_ray import load_compressed

    out, table = search
    front = pd.read_csv(out / "report" / "front.csv")
    trial = front.iloc[0]
    dest = tmp_path / "model"
    assert main(["export", str(out), "--trial", trial.trial_id, "--out", str(dest)]) == 0
    model = load_compressed(dest)
    assert sum(p.numel() for p in model.parameters()) == trial["obj.params"]
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == 64


def test_export_of_an_unfinished_trial_is_a_clear_error(search, tmp_path, capsys):
    out, table = search
    failed = table[table.status == "FAILED"].iloc[0].trial_id
    assert main(["export", str(out), "--trial", failed, "--out", str(tmp_path / "m")]) == 2
    assert "has not finished" in capsys.readouterr().err


def test_a_trial_with_two_workers_trains_on_ray_train_and_reports_through_tune(ray_local, tiny_model_dir, tmp_path):
    """resources.workers=2: the trial's Tune actor drives a TorchTrainer; its reports reach Tune."""
    point = {"atp.sparsity": 0.4, "atp.lasso_weight": 0.01, "train.lr": 0.001}
    # 0.1 CPU for the trial's driver + 2 x 0.9 for its workers fit the session's 2 CPUs.
    space = write_space(
        tmp_path, tiny_model_dir, trials=1, points=[point], concurrency=1, resources={"workers": 2, "cpus_per_worker": 0.9}
    )
    out = tmp_path / "exp"
    assert main(["search", "--space", str(space), "--out", str(out)]) == 0
    table = pd.read_csv(out / "report" / "trials.csv")
    assert table.status.tolist() == ["COMPLETED"] and math.isfinite(table["obj.quality"].iloc[0])
    trial_id = table.trial_id.iloc[0]
    # The run's checkpoints went through Ray Train's storage, under the run name the trial gave it.
    train_run = out / "trials" / trial_id / "run" / "ray" / f"exp-{trial_id}"
    assert list(train_run.glob("checkpoint_*"))
    summary = json.loads((out / "trials" / trial_id / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2  # both workers trained it, in one process group
    reports = [json.loads(line) for line in (out / "tune" / trial_id / "result.json").read_text().splitlines()]
    steps = [r["step"] for r in reports]
    assert steps == [2.0, 4.0, 6.0] and reports[-1]["final"] == 1.0  # intermediate ones from the Train controller
    assert all(r["final"] == 0.0 for r in reports[:-1])


def test_resume_retry_failed_runs_an_errored_trial_again(ray_local, tiny_model_dir, tmp_path):
    """A trial that errored (its data file unreadable) is retried by `resume --retry-failed` once fixed."""
    data = tmp_path / "notes.jsonl"
    rows = [json.dumps({"text": f"note {i}: the patient reports symptom {i % 17} since day {i % 5}."}) for i in range(400)]
    data.write_text("\n".join(rows[:200] + ["{not json"] + rows[200:]) + "\n")
    point = {"atp.sparsity": 0.4, "atp.lasso_weight": 0.01, "train.lr": 0.001}
    space = write_space(tmp_path, tiny_model_dir, trials=1, points=[point], concurrency=1)
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["data"]["source"] = {"kind": "file", "path": str(data)}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    out = tmp_path / "exp"
    assert main(["search", "--space", str(space), "--out", str(out)]) == 0
    failed = pd.read_csv(out / "report" / "trials.csv")
    assert failed.status.tolist() == ["FAILED"] and "DataError" in failed.failure_reason.iloc[0]
    assert study_states(out) == ["FAIL"]

    data.write_text("\n".join(rows) + "\n")
    assert main(["resume", str(out)]) == 0  # without the flag an errored trial stays failed
    assert pd.read_csv(out / "report" / "trials.csv").status.tolist() == ["FAILED"]
    assert main(["resume", str(out), "--retry-failed"]) == 0
    retried = pd.read_csv(out / "report" / "trials.csv")
    assert retried.status.tolist() == ["COMPLETED"] and retried.trial_id.tolist() == failed.trial_id.tolist()
    assert math.isfinite(retried["obj.quality"].iloc[0])
    assert study_states(out) == ["FAIL", "COMPLETE"]  # the study keeps the failed attempt and adds the retry


def _wait_for(condition, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"search exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its sha256 and modification time (a rewrite with equal bytes shows too)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_resume_after_the_driver_is_killed_runs_every_trial_exactly_once(ray_local, tiny_model_dir, tmp_path):
    """SIGKILL the search's driver while trial 2 trains (trial 1 finished, trial 3 not started); resume.

    One at a time, with early stopping on: trials 1 and 2 (lasso 0.01) share their step-2 vector,
    which dominates trial 3's (lasso 0.1, see the `search` fixture). Between the kill and the
    resume, the study gets a RUNNING trial, as a driver killed between Optuna's ask and Tune's
    save leaves it. After the resume:

    - trial 1 was not run again: every file in its folder is unchanged, bytes and mtime;
    - trial 2 went on from its checkpoint: no step it had checkpointed is trained or reported again;
    - the orphan study trial was closed FAIL when the searcher was restored, before any trial
      ended, and the budget holds;
    - trial 3, facing only trials 1 and 2's records from before the kill, is stopped at step 2
      (a scheduler restored with empty rungs would let it run out).
    """
    import optuna
    import torch

    from atp_ray.search.scheduler import read_stopped

    points = [
        {"atp.sparsity": 0.3, "atp.lasso_weight": 0.01},  # finishes before the kill
        {"atp.sparsity": 0.5, "atp.lasso_weight": 0.01},  # in flight at the kill
        {"atp.sparsity": 0.6, "atp.lasso_weight": 0.1},  # runs after the resume: stopped at step 2
    ]
    knobs = {"atp.sparsity": {"uniform": [0.2, 0.7]}, "atp.lasso_weight": {"loguniform": [0.001, 0.1]}}
    # 20 steps, so that trial 2 is caught in flight on an idle machine too. eta 2: a trial stops
    # only when more than half the trials at its rung beat it, so trial 3 stops at step 2 with
    # trials 1 and 2's records there (2 of 3), and never with at most one of them (1 of 2).
    # Trials 1 and 2 never beat each other by more than that either, at any rung.
    steps, early_stopping = 20, {"enabled": True, "grace": 1, "eta": 2}  # rungs at steps 2, 4, 8, 16
    space = write_space(
        tmp_path, tiny_model_dir, trials=3, points=points, steps=steps, knobs=knobs, concurrency=1,
        early_stopping=early_stopping,
    )
    out = tmp_path / "exp"
    trials, rungs = out / "trials", out / "early_stopping.jsonl"
    address = ray_local.get_runtime_context().gcs_address
    # Tune saves its experiment state every second (not every 10 s), so it soon knows trial 2.
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(Path(__file__).parents[1]), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atp_ray.cli", "search", "--space", str(space), "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def trial_with(sparsity: float) -> Path | None:
        for record in trials.glob("*/trial.json"):
            if json.loads(record.read_text())["knobs"]["atp.sparsity"] == sparsity:
                return record.parent
        return None

    def trial_2_in_flight() -> bool:
        first, second = trial_with(0.3), trial_with(0.5)
        if first is None or second is None or not (first / "objectives.json").is_file():
            return False
        saved_by_tune = any(second.name in p.read_text() for p in (out / "tune").glob("experiment_state-*.json"))
        recorded_at_rung = any(json.loads(line)["trial_id"] == second.name for line in _lines(rungs))
        run = second / "run"
        return saved_by_tune and recorded_at_rung and (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists()

    try:
        _wait_for(trial_2_in_flight, 300, "trial 1 finished and trial 2 checkpointed", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = time.time()
    first, second = trial_with(0.3), trial_with(0.5)
    assert trial_with(0.6) is None
    first_files = _fingerprint(first)
    checkpoint_step = torch.load(second / "run" / "checkpoint.pt", weights_only=True)["step"]
    metrics_before = _lines(second / "run" / "metrics.jsonl")
    rungs_before = _lines(rungs)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    # A sampled trial, asked by the dead driver for no Tune trial. (Not `study.ask()`: that would
    # take trial 3's point from the queue the searcher put it in.)
    study_id = storage.get_study_id_from_name("atp-ray")
    orphan = storage.get_trial(storage.create_new_trial(study_id)).number

    assert main(["resume", str(out)]) == 0
    assert _fingerprint(first) == first_files  # trial 1 was not run again
    table = pd.read_csv(out / "report" / "trials.csv").set_index("trial_id")
    third = trial_with(0.6)
    assert len(table) == 3 and sorted(p.name for p in trials.iterdir()) == sorted(table.index)  # the budget, once each
    assert table.status.to_dict() == {first.name: "COMPLETED", second.name: "COMPLETED", third.name: "STOPPED"}

    # Trial 2 kept the metrics rows up to its checkpoint and went on from there.
    metrics_after = _lines(second / "run" / "metrics.jsonl")
    kept = [line for line in metrics_before if json.loads(line)["step"] <= checkpoint_step]
    assert kept and metrics_after[: len(kept)] == kept
    logged = [json.loads(line)["step"] for line in metrics_after]
    assert logged == sorted(set(logged)) and logged[-1] == steps
    # (Tune's result.json reaches its storage folder late, so reports are told apart by their time.)
    reports = [json.loads(line) for line in _lines(out / "tune" / second.name / "result.json")]
    resumed = [r["step"] for r in reports if r["timestamp"] > killed_at]
    assert resumed and min(resumed) > checkpoint_step and resumed[-1] == steps

    # The study: the orphan closed on restore, before trial 2 was told; nothing left RUNNING.
    study = optuna.load_study(study_name="atp-ray", storage=storage)
    by_number = {t.number: t for t in study.trials}
    assert by_number[orphan].state.name == "FAIL"
    assert sorted(states := study_states(out)) == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED"] and "RUNNING" not in states
    told_after = [t.datetime_complete for t in study.trials if t.params.get("atp.sparsity") in (0.5, 0.6)]
    assert len(told_after) == 2 and by_number[orphan].datetime_complete < min(told_after)

    # Early stopping kept its rungs: trial 3 was stopped at step 2 against the records made before the kill.
    assert _lines(rungs)[: len(rungs_before)] == rungs_before
    assert {json.loads(line)["trial_id"] for line in rungs_before} == {first.name, second.name}
    assert set(read_stopped(rungs)) == {third.name} and read_stopped(rungs)[third.name].step == 2.0

    # Resuming the finished search again changes nothing and runs nothing.
    assert main(["resume", str(out)]) == 0
    assert pd.read_csv(out / "report" / "trials.csv").set_index("trial_id").status.to_dict() == table.status.to_dict()
    assert sorted(p.name for p in trials.iterdir()) == sorted(table.index)


def test_report_in_a_fresh_process_matches_the_search(search):
    """`atp-ray report` after the search, in a process where Ray was never started (as a user runs it)."""
    out, table = search
    shutil.rmtree(out / "report")
    done = subprocess.run(
        [sys.executable, "-m", "atp_ray.cli", "report", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    again = pd.read_csv(out / "report" / "trials.csv")
    assert again[["trial_id", "status"]].equals(table[["trial_id", "status"]])
