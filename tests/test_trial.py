"""run_trial: train -> compress -> evaluate, the per-step report hook, idempotent restarts, divergence."""

from __future__ import annotations

import json
import math

import pytest

from atp_ray.config import load_config
from atp_ray.search.objectives import Objective
from atp_ray.search.trial import TrialDiverged, TrialFolder, run_trial
from tests.conftest import tiny_run_config

OBJECTIVES = [Objective("quality", "min"), Objective("params", "min"), Objective("flops", "min")]


def _config(model_dir, **train):
    raw = tiny_run_config(model_dir, train={"steps": 6, "log_every": 2, "checkpoint_every": 3, "eval_every": 2, **train})
    raw["data"]["max_documents"] = 200
    return load_config(raw)


@pytest.fixture(scope="module")
def finished_trial(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trial")
    reports = []
    values = run_trial(_config(tiny_model_dir), out, objectives=OBJECTIVES, report=reports.append)
    return out, values, reports


def test_trial_reports_every_objective_and_ends_with_final_values(finished_trial):
    out, values, reports = finished_trial
    assert set(values) == {"quality", "params", "flops"}
    assert all(math.isfinite(v) and v > 0 for v in values.values())
    # intermediate reports at each held-out evaluation (steps 2, 4), then the final one
    assert [r["step"] for r in reports] == [2, 4, 6]
    assert all({"quality", "params", "flops"} <= set(r) for r in reports)
    assert [r["final"] for r in reports] == [0.0, 0.0, 1.0]
    assert "eval_perplexity" in reports[0] and reports[0]["quality"] == reports[0]["eval_perplexity"]


def test_quality_is_the_run_summary_perplexity(finished_trial):
    out, values, _ = finished_trial
    summary = json.loads(TrialFolder(out).run.summary.read_text())
    # One definition: the compressed model's held-out perplexity = the masked run's final one.
    # They agree exactly on CPU; 1e-6 leaves room for another device's summation order while
    # still catching one wrong MLP channel sliced (3e-6 to 3e-4 here, by which channel).
    assert values["quality"] == pytest.approx(summary["eval_perplexity"], rel=1e-6)
    assert summary["world_size"] == 1  # trained in this process


def test_eval_every_is_logged_to_metrics(finished_trial):
    out, _, _ = finished_trial
    rows = [json.loads(line) for line in TrialFolder(out).run.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_perplexity" in r] == [2, 4]


def test_trial_restarted_after_compression_failed_finishes_from_disk(finished_trial, tiny_model_dir, tmp_path):
    import shutil

    out, values, _ = finished_trial
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    folder = TrialFolder(copy)
    folder.objectives.unlink()
    shutil.rmtree(folder.compressed)  # as if it died before compressing
    summary_mtime = folder.run.summary.stat().st_mtime_ns
    again = run_trial(_config(tiny_model_dir), copy, objectives=OBJECTIVES)
    assert folder.run.summary.stat().st_mtime_ns == summary_mtime  # not trained again
    assert again["params"] == values["params"] and again["quality"] == pytest.approx(values["quality"], rel=1e-5)
    # and a finished trial just answers its objectives
    assert run_trial(_config(tiny_model_dir), copy, objectives=OBJECTIVES) == again


def test_diverging_trial_stops_with_a_clear_reason(tiny_model_dir, tmp_path):
    with pytest.raises(TrialDiverged, match="not finite"):
        run_trial(_config(tiny_model_dir, lr=1e30), tmp_path / "nan", objectives=OBJECTIVES)
    assert not TrialFolder(tmp_path / "nan").objectives.exists()


def test_speed_and_accuracy_objectives_are_reported_at_every_step_and_measured_at_the_end(tiny_model_dir, tmp_path):
    """latency / throughput scale a dense reference by the kept share in flight; accuracy is final-only."""
    objectives = [Objective("latency", "min"), Objective("throughput", "max"), Objective("accuracy", "max", "hpo-term", 8)]
    reports = []
    values = run_trial(_config(tiny_model_dir), tmp_path / "trial", objectives=objectives, report=reports.append)
    assert set(values) == {"latency", "throughput", "accuracy"}
    assert values["latency"] > 0 and values["throughput"] > 0 and 0 <= values["accuracy"] <= 1
    intermediate = [r for r in reports if r["final"] == 0.0]
    assert intermediate and all({"latency", "throughput", "accuracy"} <= set(r) for r in intermediate)
    for r in intermediate:  # in flight: one dense reference, scaled by the share of parameters kept
        assert r["latency"] * r["throughput"] == pytest.approx(intermediate[0]["latency"] * intermediate[0]["throughput"])
        assert r["accuracy"] == 0.0


def test_the_dense_model_is_measured_once_like_a_trial_s_model_on_the_same_split(finished_trial, tiny_model_dir):
    """reference.json holds the dense model's objectives: its parameters, FLOPs and perplexity on
    the run's own held-out split (the same blocks the trial's quality is measured on)."""
    from atp_ray.search.objectives import DenseMeasure, dense_reference
    from atp_ray.training.atp import FINAL_EVAL_BLOCKS
    from tests.conftest import make_tiny_model

    out, values, _ = finished_trial
    dense = json.loads(TrialFolder(out).reference.read_text())
    assert set(dense) == {"quality", "params", "flops", "parameters"}
    assert dense["params"] == dense["parameters"] == sum(p.numel() for p in make_tiny_model("llama-gqa").parameters())
    assert dense["params"] > values["params"] and dense["flops"] > values["flops"]
    # The same split: measured the dense way, the trial's own compressed model scores its quality.
    config = _config(tiny_model_dir)
    same_split = DenseMeasure(
        str(TrialFolder(out).compressed), config.data, config.train.seed, FINAL_EVAL_BLOCKS, config.train.batch_size,
        "cpu", "float32",
    )
    assert same_split.task("domain-ppl", "perplexity", FINAL_EVAL_BLOCKS) == pytest.approx(values["quality"], rel=1e-6)
    # Kept: a second call measures nothing (a measure that fails proves it).
    assert dense_reference(None, OBJECTIVES, TrialFolder(out).reference) == dense


@pytest.fixture(scope="module")
def elastic_trial(tiny_model_dir, tmp_path_factory):
    """One elastic trial: budgets 0.2 and 0.5 of one run."""
    raw = tiny_run_config(tiny_model_dir, train={"steps": 6, "log_every": 2, "checkpoint_every": 3, "eval_every": 2})
    raw["data"]["max_documents"] = 200
    raw["atp"]["sparsity"] = [0.2, 0.5]
    out = tmp_path_factory.mktemp("elastic-trial")
    reports = []
    values = run_trial(load_config(raw), out, objectives=OBJECTIVES[:2], report=reports.append)
    return load_config(raw), out, values, reports


def test_an_elastic_trial_compresses_and_measures_every_budget(elastic_trial):
    config, out, values, reports = elastic_trial
    folder = TrialFolder(out)
    assert sorted(p.name for p in folder.compressed.iterdir()) == ["sparsity-0.2", "sparsity-0.5"]
    saved = json.loads(folder.objectives.read_text())
    assert set(saved["budgets"]) == {"0.2", "0.5"}
    budgets = saved["budgets"]
    assert budgets["0.5"]["params"] < budgets["0.2"]["params"]
    # Optuna's vector: each objective's mean over the budgets; the report carries each budget too
    for name in ("quality", "params"):
        assert saved[name] == pytest.approx((budgets["0.2"][name] + budgets["0.5"][name]) / 2)
        assert values[name] == saved[name] and values[f"{name}@0.5"] == budgets["0.5"][name]
    assert folder.read_points() == {0.2: budgets["0.2"], 0.5: budgets["0.5"]}
    # one definition of quality per budget: the run's own final perplexity at that budget
    summary = json.loads(folder.run.summary.read_text())
    for key in ("0.2", "0.5"):
        assert budgets[key]["quality"] == pytest.approx(summary["budgets"][key]["eval_perplexity"], rel=1e-6)
    assert reports[-1] == {**values, "step": 6.0, "final": 1.0}


def test_an_elastic_trial_reports_each_budget_at_every_evaluation(elastic_trial):
    _, _, _, reports = elastic_trial
    intermediate = [r for r in reports if r["final"] == 0.0]
    assert [r["step"] for r in intermediate] == [2, 4]
    for r in intermediate:
        assert r["quality@0.2"] == r["eval_perplexity@0.2"] and r["quality@0.5"] == r["eval_perplexity@0.5"]
        # the objective is the mean over the budgets, not the training metric "params" of the step's drawn budget
        assert r["params"] == pytest.approx((r["params@0.2"] + r["params@0.5"]) / 2)
        assert r["quality"] == pytest.approx((r["quality@0.2"] + r["quality@0.5"]) / 2)


def test_an_elastic_trial_restarted_in_compression_keeps_the_budgets_done(elastic_trial, tmp_path):
    import shutil

    config, out, values, _ = elastic_trial
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    folder = TrialFolder(copy)
    folder.objectives.unlink()
    shutil.rmtree(folder.model(0.5))  # as if it died after compressing the first budget
    kept = folder.model(0.2).stat().st_mtime_ns
    again = run_trial(config, copy, objectives=OBJECTIVES[:2])
    assert folder.model(0.2).stat().st_mtime_ns == kept and (folder.model(0.5) / "compression.json").is_file()
    assert again["params@0.5"] == values["params@0.5"] and again["quality"] == pytest.approx(values["quality"], rel=1e-5)


def test_concurrent_trials_measure_the_dense_model_once_and_an_older_cache_is_completed(tmp_path):
    """dense.json is shared by a search's trials: the first measures under a lock, the others wait and read."""
    import threading
    import time

    from atp_ray.search.objectives import dense_reference

    class Measure:  # stands for DenseMeasure: counts what it is asked
        eval_blocks = 32

        def __init__(self):
            self.calls = []

        def task(self, task, metric, samples):
            self.calls.append(task)
            time.sleep(0.2)  # long enough for the other threads to arrive while it measures
            return 20.0

        def params(self):
            self.calls.append("params")
            return 1000.0

        def speed(self, name):
            self.calls.append(name)
            return 5.0

    cache, measure = tmp_path / "dense.json", Measure()
    threads = [threading.Thread(target=dense_reference, args=(measure, OBJECTIVES[:2], cache)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert measure.calls == ["domain-ppl", "params"]  # one measurement for the three of them
    assert json.loads(cache.read_text()) == {"quality": 20.0, "params": 1000.0, "parameters": 1000.0}
    # a cache without an objective asked now (an older search's) gets it added, the rest kept
    assert dense_reference(measure, OBJECTIVES, cache)["flops"] == 5.0
    assert measure.calls == ["domain-ppl", "params", "flops"]
