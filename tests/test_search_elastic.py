"""A search over an elastic space, end to end on the tiny model: every trial trains one generator
for three sparsity budgets, and the report's front holds several budgets of one trial.

Two trials (two at once, about a minute on 2 cores), the budgets fixed in the space's
overrides, the shipped early-stopping scheduler on but lenient enough that no trial stops (it
still records each trial's points at its rungs).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from atp_ray.cli import main
from test_report_browser import browser, dense_stars, front_markers, open_report  # noqa: F401 (a fixture)
from test_search import dominated, write_space

BUDGETS = [0.2, 0.4, 0.6]
KNOBS = {"atp.lasso_weight": {"loguniform": [0.001, 0.1]}, "atp.generator_lr": {"loguniform": [0.005, 0.05]}}
POINTS = [{"atp.lasso_weight": 0.01, "atp.generator_lr": 0.02}, {"atp.lasso_weight": 0.001, "atp.generator_lr": 0.05}]
# eta 1.5: a trial stops only when more than 2/3 of the trials at its rung beat it: never with two
EARLY_STOPPING = {"enabled": True, "grace": 1, "eta": 1.5}


@pytest.fixture(scope="module")
def elastic_search(ray_local, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic-search")
    space = write_space(
        tmp, tiny_model_dir, trials=2, points=POINTS, knobs=KNOBS, concurrency=2, early_stopping=EARLY_STOPPING,
        overrides={"atp.sparsity": {"range": [0.2, 0.6], "points": 3}},  # every trial elastic
    )
    out = tmp / "exp"
    assert main(["search", "--space", str(space), "--out", str(out)]) == 0
    return out, pd.read_csv(out / "report" / "trials.csv")


def test_an_elastic_search_ends_with_a_front_holding_several_budgets_of_one_trial(elastic_search):
    out, table = elastic_search
    assert len(table) == 6 and set(table.status) == {"COMPLETED"}  # one row per (trial, budget)
    for trial_id, rows in table.groupby("trial_id"):
        assert rows.budget.tolist() == BUDGETS
        assert rows["knob.atp.lasso_weight"].nunique() == 1  # the trial's knobs on each of its rows
        assert all(p.endswith(f"{trial_id}/compressed/sparsity-{b:g}") for p, b in zip(rows.model_path, rows.budget))
    values = table[["obj.quality", "obj.params"]].to_numpy(float)
    labels = [f"{t}@{b:g}" for t, b in zip(table.trial_id, table.budget)]
    non_dominated = {label for label, v in zip(labels, values) if not dominated(v, values)}
    front = pd.read_csv(out / "report" / "front.csv")
    assert {f"{t}@{b:g}" for t, b in zip(front.trial_id, front.budget)} == non_dominated
    assert front.trial_id.value_counts().max() >= 2  # several budgets of one trial on the front


def test_optuna_is_told_each_objective_s_mean_over_the_trial_s_budgets(elastic_search):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    out, table = elastic_search
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name="atp-ray", storage=storage)
    told = sorted(tuple(t.values) for t in study.trials)
    means = sorted(tuple(rows[["obj.quality", "obj.params"]].mean()) for _, rows in table.groupby("trial_id"))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    assert np.allclose(told, means, rtol=1e-9)


def test_intermediate_reports_and_rungs_carry_every_budget(elastic_search):
    out, table = elastic_search
    for trial_id in table.trial_id.unique():
        reports = [json.loads(line) for line in (out / "tune" / trial_id / "result.json").read_text().splitlines()]
        assert [r["step"] for r in reports] == [2.0, 4.0, 6.0]
        assert all({f"quality@{b:g}" for b in BUDGETS} <= set(r) for r in reports)
    rungs = [json.loads(line) for line in (out / "early_stopping.jsonl").read_text().splitlines()]
    assert rungs and all(len(r["points"]) == len(BUDGETS) and not r["stopped"] for r in rungs)


def test_the_dense_model_is_measured_once_and_drawn_on_the_report(elastic_search, browser, capsys):
    out, table = elastic_search
    dense = json.loads((out / "dense.json").read_text())
    assert {"quality", "params", "parameters"} <= set(dense)
    assert not list((out / "trials").glob("*/reference.json"))  # one measurement for the whole search
    assert dense["params"] > table["obj.params"].max() and math.isfinite(dense["quality"])

    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"dense model (before pruning): quality={dense['quality']:.6g}, params={dense['params']:.6g}" in printed
    assert "point(s) of" in printed  # the front counts points and trials apart
    report = open_report(browser, out / "report" / "report.html")
    front = pd.read_csv(out / "report" / "front.csv")
    points = {f"{t}@{b:g}" for t, b in zip(front.trial_id, front.budget)}
    assert front_markers(report.page) == {f"{t}@{b:g}": f"{t}@{b:g}" in points for t, b in zip(table.trial_id, table.budget)}
    assert len(dense_stars(report.page)) == 1  # one objective pair, one panel, one star
    assert report.problems == [] and report.external == []
    report.page.close()


def test_export_of_an_elastic_trial_takes_one_of_its_budgets(elastic_search, tmp_path, capsys):
    import torch

    from atp_ray import load_compressed

    out, table = elastic_search
    trial_id = table.trial_id.iloc[0]
    assert main(["export", str(out), "--trial", trial_id, "--out", str(tmp_path / "none")]) == 2
    assert "choose one of 0.2, 0.4, 0.6" in capsys.readouterr().err
    assert main(["export", str(out), "--trial", trial_id, "--sparsity", "0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "no model at sparsity 0.5; its budgets: 0.2, 0.4, 0.6" in capsys.readouterr().err
    dest = tmp_path / "model"
    assert main(["export", str(out), "--trial", trial_id, "--sparsity", "0.4", "--out", str(dest)]) == 0
    row = table[(table.trial_id == trial_id) & (table.budget == 0.4)].iloc[0]
    model = load_compressed(dest)
    assert sum(p.numel() for p in model.parameters()) == row["obj.params"]
    assert json.loads((dest / "objectives.json").read_text()) == pytest.approx({"quality": row["obj.quality"], "params": row["obj.params"]})
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == 64


def test_mlflow_is_given_names_it_accepts():
    """MLflow refuses "@" in metric names (letters, digits, _ - . / and spaces only)."""
    import re
    from types import SimpleNamespace

    from atp_ray.search.tuner import MLflowLogger

    logged = {}
    logger = MLflowLogger.__new__(MLflowLogger)  # without mlflow installed: only the renaming is tested
    logger._trial_runs = {"trial": "run-1"}
    logger.mlflow_util = SimpleNamespace(log_metrics=lambda run_id, metrics_to_log, step: logged.update(metrics_to_log))
    logger.log_trial_result(1, "trial", {"training_iteration": 1, "quality": 60.0, "quality@0.2": 50.0, "eval_perplexity@0.35": 51.0})
    assert logged == {"training_iteration": 1, "quality": 60.0, "quality_at_0.2": 50.0, "eval_perplexity_at_0.35": 51.0}
    assert all(re.fullmatch(r"[/\w.\- ]+", name) for name in logged)
