"""Pareto-aware early stopping: the MO-ASHA rule on arrays, its rungs, and a real Tune run."""

import pickle

import numpy as np
import pytest

from atp_ray.search.scheduler import ParetoEarlyStopping, ParetoRungs, read_stopped, rung_decision

MIN_MIN = ["min", "min"]


def test_rule_stops_what_cannot_reach_the_top_third():
    # Rung holds a (1, 5), b (5, 1) on the front; c (6, 6) in front 1; d (7, 7) in front 2.
    values = np.array([[1, 5], [5, 1], [6, 6], [7, 7]], dtype=float)
    # With eta = 3 a trial stops when more than n/3 trials are in strictly better fronts.
    assert [rung_decision(values, i, MIN_MIN, eta=3) for i in range(4)] == [False, False, True, True]
    # A more lenient eta (stop only when over 3/4 beat it) keeps c (2/4) and d (3/4).
    assert [rung_decision(values, i, MIN_MIN, eta=4 / 3) for i in range(4)] == [False, False, False, False]


def test_rule_never_stops_the_first_trial_or_a_front_member_and_ranks_nan_last():
    assert not rung_decision(np.array([[9.0, 9.0]]), 0, MIN_MIN, eta=3)
    values = np.array([[1, 1], [2, 2], [0.5, 3], [np.nan, 0]], dtype=float)
    assert not rung_decision(values, 2, MIN_MIN, eta=3)  # (0.5, 3) trades off against (1, 1)
    assert rung_decision(values, 3, MIN_MIN, eta=3)  # a NaN vector sorts after every finite one


def test_rule_follows_modes():
    values = np.array([[0.9, 10], [0.5, 10]], dtype=float)  # accuracy (max), size (min)
    assert rung_decision(values, 1, ["max", "min"], eta=3)
    assert not rung_decision(values, 1, ["min", "min"], eta=3)


def test_a_trial_with_several_points_stands_in_the_front_of_its_best_and_counts_once():
    # Trial x has two points: (1, 5) on the front and (6, 6) in front 1. y has (5, 1) on the
    # front; z has (7, 7) and (8, 8), in fronts 2 and 3. Counted by trials: none beats x or y;
    # x and y (2 of 3 trials) beat z.
    values = np.array([[1, 5], [6, 6], [5, 1], [7, 7], [8, 8]], dtype=float)
    owners = ["x", "x", "y", "z", "z"]
    decisions = [rung_decision(values, i, MIN_MIN, eta=3, owners=owners) for i in range(5)]
    assert decisions == [False, False, False, True, True]  # one answer per trial, whichever row is asked
    # eta 1.45: stop only when more than 69% of the trials beat it. Counted by points, z's
    # (8, 8) would lie behind 4 of 5 rows (80%) and stop; counted by trials it is 2 of 3 (67%).
    assert not rung_decision(values, 4, MIN_MIN, eta=1.45, owners=owners)
    assert rung_decision(values, 4, MIN_MIN, eta=1.45)  # each row a trial of its own
    with pytest.raises(ValueError, match="owners"):
        rung_decision(values, 0, MIN_MIN, eta=3, owners=["x"])


def test_an_elastic_trial_goes_on_while_any_of_its_points_is_on_the_rung_front(tmp_path):
    path = tmp_path / "rungs.jsonl"
    rungs = ParetoRungs(MIN_MIN, grace=1, eta=3, record_path=path)
    assert not rungs.on_result("a", 1, [2, 2])
    # e's mean (3, 5) is dominated by a, yet its point (1, 5) trades off against a: it goes on.
    assert not rungs.on_result("e", 1, [3, 5], points=[[1, 5], [5, 5]])
    # f's points are both dominated by a: a and e (2 of 3) beat its best one. Stopped.
    assert rungs.on_result("f", 1, [3.5, 3.5], points=[[3, 3], [4, 4]])
    assert rungs.rungs[0]["e"] == ((1, 5), (5, 5)) and rungs.rungs[0]["a"] == ((2, 2),)
    # The record file keeps the points: a resumed search judges against them.
    with open(path, "a") as f:  # a record written before elastic trials existed (no "points")
        f.write('{"trial_id": "old", "rung": 0, "step": 1.0, "values": [9, 9], "stopped": false}\n')
    resumed = ParetoRungs(MIN_MIN, grace=1, eta=3, record_path=path)
    assert resumed.rungs[0] == {**rungs.rungs[0], "old": ((9, 9),)} and set(resumed.stopped) == {"f"}
    assert not resumed.on_result("g", 1, [0, 9])  # trades off against a and e's (1, 5)


def test_the_scheduler_reads_an_elastic_trial_s_points_from_its_budget_keys(tmp_path):
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    scheduler = ParetoEarlyStopping(["loss", "size"], MIN_MIN, time_attr="step", grace=1, eta=3)
    single = {"step": 1, "loss": 2.0, "size": 2.0}
    elastic = {"step": 1, "loss": 3.0, "size": 5.0, "loss@0.2": 1.0, "size@0.2": 5.0, "loss@0.5": 5.0, "size@0.5": 5.0}
    assert scheduler._points(single) is None
    assert scheduler._points(elastic) == [[1.0, 5.0], [5.0, 5.0]]
    assert scheduler._points({**elastic, "size@0.5": float("nan")}) is None
    trial = SimpleNamespace
    assert scheduler.on_trial_result(None, trial(trial_id="a"), single) == TrialScheduler.CONTINUE
    # judged by its mean alone it would stop (dominated by a); by its points it goes on
    assert scheduler.on_trial_result(None, trial(trial_id="e"), elastic) == TrialScheduler.CONTINUE
    assert scheduler.rungs.rungs[0]["e"] == ((1.0, 5.0), (5.0, 5.0))


def test_rungs_sit_at_grace_times_powers_of_eta():
    rungs = ParetoRungs(MIN_MIN, grace=2, eta=3)
    assert [rungs.rung_at(s) for s in (1, 2, 5, 6, 17, 18, 54)] == [None, 0, 0, 1, 1, 2, 3]


def test_each_trial_is_judged_once_per_rung_and_only_at_the_highest_reached(tmp_path):
    rungs = ParetoRungs(MIN_MIN, grace=1, eta=3, record_path=tmp_path / "rungs.jsonl")
    assert not rungs.on_result("a", 1, [1, 1])
    assert rungs.on_result("b", 1, [2, 2])  # dominated by a, 1/2 > 1/3
    assert not rungs.on_result("a", 2, [9, 9])  # rung 0 already holds a; step 2 reaches no new rung
    assert not rungs.on_result("c", 4, [5, 5])  # first at rung 1 (step 3); rung 0, skipped, stays without it
    assert set(rungs.rungs[0]) == {"a", "b"} and set(rungs.rungs[1]) == {"c"}
    assert set(rungs.stopped) == {"b"} and rungs.stopped["b"].rung == 0


def test_record_file_replays_on_resume_and_tells_the_report(tmp_path):
    path = tmp_path / "rungs.jsonl"
    first = ParetoRungs(MIN_MIN, grace=1, eta=3, record_path=path)
    first.on_result("a", 1, [1, 1])
    first.on_result("b", 1, [2, 2])
    with open(path, "a") as f:
        f.write('{"trial_id": "torn')  # the driver died mid-write
    resumed = ParetoRungs(MIN_MIN, grace=1, eta=3, record_path=path)
    assert resumed.rungs == first.rungs and set(resumed.stopped) == {"b"}
    assert resumed.on_result("c", 1, [3, 3])  # judged against a and b from before the restart
    assert set(read_stopped(path)) == {"b", "c"}
    assert read_stopped(tmp_path / "absent.jsonl") == {}


def test_a_scheduler_unpickled_on_resume_replays_its_record_file(tmp_path):
    """Tune restores a search's scheduler from the copy it pickled when the search started."""
    path = tmp_path / "rungs.jsonl"
    scheduler = ParetoEarlyStopping(["loss", "size"], MIN_MIN, time_attr="step", grace=1, eta=3, record_path=path)
    saved = pickle.dumps(scheduler)  # as Tuner() does, before any trial reported
    scheduler.rungs.on_result("a", 1, [1, 1])
    assert scheduler.rungs.on_result("b", 1, [2, 2])
    restored = pickle.loads(saved)  # the driver died; `atp-ray resume` restores the Tuner
    assert restored.rungs.rungs == scheduler.rungs.rungs and set(restored.stopped) == {"b"}
    assert restored.rungs.on_result("c", 1, [3, 3])  # judged against a and b from before the kill
    assert restored.rungs.on_result("b", 2, [0, 0])  # b, stopped before the kill, stays stopped
    assert not restored.rungs.on_result("a", 2, [9, 9])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(modes=["min", "best"], grace=1), "modes"),
        (dict(modes=MIN_MIN, grace=0), "grace"),
        (dict(modes=MIN_MIN, grace=1, eta=1), "eta"),
    ],
)
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParetoRungs(**kwargs)


# -- one small real Tune run --------------------------------------------------------------

STEPS = 9


def _trainable(config):
    """A cheap two-objective curve: loss falls to `q`, size stays `z`; reported every step."""
    from ray import tune

    for step in range(1, STEPS + 1):
        tune.report({"step": step, "loss": config["point"]["q"] + 1.0 / step, "size": config["point"]["z"]})


def test_scheduler_stops_dominated_trials_in_a_real_tune_run(ray_local, tmp_path):
    from ray import tune

    # Run one at a time, in this order: a and b trade off; c and d are dominated at every step.
    points = [{"name": "a", "q": 0.0, "z": 1.0}, {"name": "b", "q": 1.0, "z": 0.0}]
    points += [{"name": "c", "q": 2.0, "z": 2.0}, {"name": "d", "q": 3.0, "z": 3.0}]
    record = tmp_path / "rungs.jsonl"
    scheduler = ParetoEarlyStopping(["loss", "size"], ["min", "min"], time_attr="step", grace=1, eta=3, record_path=record)
    tuner = tune.Tuner(
        _trainable,
        param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="mo-asha", verbose=0),
    )
    grid = tuner.fit()
    last_step = {r.config["point"]["name"]: r.metrics["step"] for r in grid}
    stopped_names = {r.config["point"]["name"] for r in grid if r.metrics["trial_id"] in scheduler.stopped}
    assert stopped_names == {"c", "d"}
    assert last_step == {"a": STEPS, "b": STEPS, "c": 1, "d": 1}  # stopped at the first rung, not run out
    assert set(read_stopped(record)) == set(scheduler.stopped)
