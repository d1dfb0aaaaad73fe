"""The search report from a synthetic trial table: tables, front, hypervolume, page and PNGs."""

import math
import re

import numpy as np
import pandas as pd
import pytest

from atp_ray.search.front import hypervolume
from atp_ray.search.report import write_report
from atp_ray.search.report_data import prepare_report

OBJECTIVES = {"perplexity": "min", "params": "min", "latency_ms": "min"}


def synthetic_table() -> pd.DataFrame:
    """Eight trials of every status. Among the COMPLETED ones, t2 is dominated by t0 and t4 by
    t1; t5 (STOPPED) and t7 (RUNNING) would dominate everything but must never be on the front."""
    rows = [
        ("t0", "COMPLETED", 10, 100, 5),
        ("t1", "COMPLETED", 12, 80, 4),
        ("t2", "COMPLETED", 11, 120, 6),
        ("t3", "COMPLETED", 15, 60, 3),
        ("t4", "COMPLETED", 16, 90, 5),
        ("t5", "STOPPED", 1, 1, 1),
        ("t6", "FAILED", math.nan, math.nan, math.nan),
        ("t7", "RUNNING", 9, 50, 2),
    ]
    table = pd.DataFrame(rows, columns=["trial_id", "status", "obj.perplexity", "obj.params", "obj.latency_ms"])
    n = len(table)
    table["knob.atp.sparsity"] = np.linspace(0.2, 0.6, n)
    table["knob.atp.lasso_weight"] = np.logspace(-4, -1, n)  # three decades: a log colour scale
    table["knob.train.optimizer"] = ["adamw", "sgd"] * (n // 2)  # a choice knob: categorical colours
    table["model_path"] = [f"/exp/{t}/compressed" if s == "COMPLETED" else None for t, s in zip(table.trial_id, table.status)]
    table["run_dir"] = [f"/exp/{t}" for t in table.trial_id]
    table["wall_time_s"] = np.arange(n, dtype=float) * 10 + 30
    table["failure_reason"] = [None] * 6 + ["non-finite loss at step 12", None]
    return table


def synthetic_curves(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    curves = {}
    for i, trial_id in enumerate(table.trial_id):
        last = 3 if trial_id == "t5" else 20  # the stopped trial ended early
        steps = np.arange(0, last + 1, 2 if last > 3 else 1)
        curves[trial_id] = pd.DataFrame(
            {"step": steps, "loss": 3.0 - 0.05 * steps + 0.1 * i, "sparsity": np.minimum(table["knob.atp.sparsity"][i], 0.03 * steps), "phase": "control"}
        )
    return curves


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    table = synthetic_table()
    out = tmp_path_factory.mktemp("report")
    summary = write_report(table, OBJECTIVES, synthetic_curves(table), out, running=True)
    return table, out, summary


def test_front_is_the_non_dominated_completed_trials_only(report):
    table, out, summary = report
    front = pd.read_csv(out / "front.csv")
    assert front["trial_id"].tolist() == ["t0", "t1", "t3"] == summary.front
    assert front["model_path"].tolist() == ["/exp/t0/compressed", "/exp/t1/compressed", "/exp/t3/compressed"]
    assert {"knob.atp.sparsity", "knob.train.optimizer", "obj.params"} <= set(front.columns)


def test_trial_tables_hold_every_trial_and_column(report):
    table, out, _ = report
    for saved in (pd.read_parquet(out / "trials.parquet"), pd.read_csv(out / "trials.csv")):
        assert saved["trial_id"].tolist() == table["trial_id"].tolist()
        assert set(table.columns) <= set(saved.columns)
        assert saved["on_front"].tolist() == [True, True, False, True, False, False, False, False]


def test_hypervolume_counts_completed_trials_only_with_derived_reference(report):
    table, _, summary = report
    # Completed rows span perplexity 10..16, params 60..120, latency 3..6: worst + 10% of range.
    assert summary.reference == pytest.approx([16.6, 126.0, 6.3])
    completed = table[table.status == "COMPLETED"][["obj.perplexity", "obj.params", "obj.latency_ms"]].to_numpy()
    assert summary.hypervolume == pytest.approx(hypervolume(completed, ["min"] * 3, summary.reference))
    assert summary.hypervolume < hypervolume(table.iloc[:6, 2:5].to_numpy(), ["min"] * 3, summary.reference)
    text = summary.text()
    assert "Pareto front: 3 trial(s): t0, t1, t3" in text and "reference point perplexity=16.6" in text
    assert "still running" in text


def test_hypervolume_history_and_explicit_reference():
    table = synthetic_table()
    data = prepare_report(table, OBJECTIVES, {}, reference=[20, 200, 10])
    assert data.history["trial_id"].tolist() == ["t0", "t1", "t2", "t3", "t4"]
    hv = data.history["hypervolume"].to_numpy()
    assert hv[0] == pytest.approx(10 * 100 * 5)  # t0 alone: (20-10) x (200-100) x (10-5)
    assert np.all(np.diff(hv) >= 0) and hv[2] == hv[1] and hv[-1] == data.hypervolume  # t2 adds nothing


def test_knob_colour_scales_follow_the_knob_kind():
    data = prepare_report(synthetic_table(), OBJECTIVES, {})
    assert data.colours["knob.atp.lasso_weight"].title.endswith("(log scale)")
    assert data.colours["knob.atp.lasso_weight"].values[0] == pytest.approx(-4)
    assert data.colours["knob.train.optimizer"].ticktext == ["adamw", "sgd"]
    assert data.colours["knob.atp.sparsity"].tickvals is None


def test_page_says_running_only_while_running(report, tmp_path):
    table, out, _ = report
    page = (out / "report.html").read_text()
    assert "still running" in page and "/exp/t3/compressed" in page
    assert re.search(r"<script[^>]*\bsrc=", page) is None  # Plotly inline: nothing to fetch
    write_report(table, OBJECTIVES, synthetic_curves(table), tmp_path, running=False)
    assert "still running" not in (tmp_path / "report.html").read_text()


def test_pngs_are_written(report):
    _, out, summary = report
    for name in ("front.png", "curves.png", "hypervolume.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert out / name in summary.files


def test_report_of_a_search_with_nothing_completed(tmp_path):
    table = synthetic_table()
    table["status"] = "RUNNING"
    summary = write_report(table, OBJECTIVES, {}, tmp_path, running=True)
    assert summary.front == [] and summary.reference is None and summary.hypervolume == 0.0
    assert "no completed trial" in summary.text()


@pytest.mark.parametrize(
    "change, objectives, match",
    [
        (lambda t: t.drop(columns="run_dir"), OBJECTIVES, r"missing column\(s\) \['run_dir'\]"),
        (lambda t: t, {**OBJECTIVES, "accuracy": "max"}, r"missing column\(s\) \['obj.accuracy'\]"),
        (lambda t: t.assign(status="DONE"), OBJECTIVES, "'status' must be one of"),
        (lambda t: t, {**OBJECTIVES, "params": "smallest"}, "mode must be one of"),
        (lambda t: t.assign(trial_id="same"), OBJECTIVES, r"\(trial_id, budget\) must be unique, repeated \['same'\]"),
        (lambda t: t.assign(trial_id="e", budget=0.2), OBJECTIVES, r"repeated \['e@0.2'\]"),
        (lambda t: t.assign(status=["DENSE"] * 2 + ["COMPLETED"] * 6), OBJECTIVES, "at most one DENSE row"),
    ],
)
def test_bad_table_names_the_problem(change, objectives, match):
    with pytest.raises(ValueError, match=match):
        prepare_report(change(synthetic_table()), objectives, {})


# -- an elastic search: several points per trial, and the dense model as a reference ----------


def elastic_table() -> pd.DataFrame:
    """Two elastic trials of three budgets, a trial with one model, a failed elastic trial, the dense model.

    Among the completed points, e2@0.2 is dominated by e1@0.2, e1@0.4 by e2@0.4 and e2@0.6 by
    e1@0.6; s1 trades off against every other. The dense model (perplexity 8) would beat every
    perplexity but is a reference: never on the front, never in the hypervolume.
    """
    rows = [
        ("e1", 0.2, "COMPLETED", 10, 100, 5),
        ("e1", 0.4, "COMPLETED", 14, 70, 4),
        ("e1", 0.6, "COMPLETED", 30, 50, 3),
        ("e2", 0.2, "COMPLETED", 11, 100, 5),
        ("e2", 0.4, "COMPLETED", 13, 70, 4),
        ("e2", 0.6, "COMPLETED", 40, 50, 3),
        ("s1", math.nan, "COMPLETED", 12, 60, 6),
        ("f1", 0.2, "FAILED", math.nan, math.nan, math.nan),
        ("f1", 0.6, "FAILED", math.nan, math.nan, math.nan),
        ("dense", math.nan, "DENSE", 8, 130, 7),
    ]
    table = pd.DataFrame(rows, columns=["trial_id", "budget", "status", "obj.perplexity", "obj.params", "obj.latency_ms"])
    lasso = {"e1": 0.01, "e2": 0.001, "s1": 0.1, "f1": 0.05, "dense": math.nan}
    table["knob.atp.lasso_weight"] = table.trial_id.map(lasso)
    completed = table.status == "COMPLETED"
    table["model_path"] = [
        f"/exp/{t}/compressed" + (f"/sparsity-{b:g}" if b == b else "") if c else None
        for t, b, c in zip(table.trial_id, table.budget, completed)
    ]
    table["run_dir"] = [f"/exp/{t}/run" for t in table.trial_id]
    table["wall_time_s"] = 60.0
    table["failure_reason"] = [None] * 7 + ["diverged at step 2"] * 2 + [None]
    return table


def elastic_curves() -> dict[str, pd.DataFrame]:
    steps = np.arange(0, 21, 2)
    return {t: pd.DataFrame({"step": steps, "loss": 3.0 - 0.05 * steps, "sparsity": 0.02 * steps}) for t in ("e1", "e2", "s1", "f1")}


@pytest.fixture(scope="module")
def elastic_report(tmp_path_factory):
    table = elastic_table()
    out = tmp_path_factory.mktemp("elastic-report")
    summary = write_report(table, OBJECTIVES, elastic_curves(), out)
    return table, out, summary


def test_the_front_holds_several_budgets_of_one_trial_and_never_the_dense_model(elastic_report):
    _, out, summary = elastic_report
    assert summary.front == ["e1@0.2", "e1@0.6", "e2@0.4", "s1"]
    front = pd.read_csv(out / "front.csv")
    assert front.trial_id.tolist() == ["e1", "e1", "e2", "s1"]
    assert front.budget.tolist()[:3] == [0.2, 0.6, 0.4] and math.isnan(front.budget.iloc[3])
    assert front.model_path.tolist()[:2] == ["/exp/e1/compressed/sparsity-0.2", "/exp/e1/compressed/sparsity-0.6"]
    saved = pd.read_csv(out / "trials.csv")  # the points alone: the dense model is in the summary
    assert saved.point.tolist() == ["e1@0.2", "e1@0.4", "e1@0.6", "e2@0.2", "e2@0.4", "e2@0.6", "s1", "f1@0.2", "f1@0.6"]


def test_trials_are_counted_once_and_the_hypervolume_grows_per_trial(elastic_report):
    table, _, summary = elastic_report
    assert summary.by_status == {"COMPLETED": 3, "RUNNING": 0, "PENDING": 0, "FAILED": 1, "STOPPED": 0}
    assert "Pareto front: 4 point(s) of 3 trial(s): e1@0.2, e1@0.6, e2@0.4, s1" in summary.text()
    # The reference point and the hypervolume come from the completed points only (not the dense model).
    assert summary.reference == pytest.approx([43.0, 105.0, 6.3])
    completed = table[table.status == "COMPLETED"][["obj.perplexity", "obj.params", "obj.latency_ms"]].to_numpy()
    assert summary.hypervolume == pytest.approx(hypervolume(completed, ["min"] * 3, summary.reference))
    data = prepare_report(table, OBJECTIVES, elastic_curves())
    assert data.history.trial_id.tolist() == ["e1", "e2", "s1"]  # one entry per trial, not per point
    e1_alone = hypervolume(completed[:3], ["min"] * 3, summary.reference)
    assert data.history.hypervolume.tolist() == pytest.approx([e1_alone, hypervolume(completed[:6], ["min"] * 3, summary.reference), summary.hypervolume])
    assert data.curves.trial_id.tolist() == [t for t in ("e1", "e2", "s1", "f1") for _ in range(11)]  # each curve once


def test_the_dense_model_is_named_in_the_summary_and_the_page(elastic_report):
    _, out, summary = elastic_report
    assert summary.dense == {"perplexity": 8.0, "params": 130.0, "latency_ms": 7.0}
    assert "dense model (before pruning): perplexity=8, params=130, latency_ms=7" in summary.text()
    page = (out / "report.html").read_text()
    assert "the red star" in page and "budget (target sparsity)" in page  # the budget colours the front too
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_a_dense_row_or_budgets_the_report_says_nothing_of_them(report):
    _, out, summary = report
    assert summary.dense is None and "dense" not in summary.text()
    assert "red star" not in (out / "report.html").read_text()
    assert pd.read_csv(out / "front.csv").budget.isna().all()
