"""StudySearch tells Optuna the truth: COMPLETE only with final finite values, FAIL on error, PRUNED when stopped."""

from __future__ import annotations

import math

from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from atp_ray.search.samplers import SamplerFactory
from atp_ray.search.tuner import StudySearch

METRICS = ["quality", "params"]


def make_search(path, max_concurrent=8):
    return StudySearch(
        space={"atp.sparsity": FloatDistribution(0.1, 0.9)},
        metric=METRICS,
        mode=["min", "min"],
        sampler_factory=SamplerFactory("random", seed=0, population_size=2),
        study_name="s",
        storage=JournalStorage(JournalFileBackend(str(path / "study.journal"))),
        max_concurrent=max_concurrent,
    )


def states(search):
    return [t.state.name for t in search._ot_study.get_trials(deepcopy=False)]


def test_each_ending_reaches_the_study_as_what_it_was(tmp_path):
    search = make_search(tmp_path)
    for tid in "abcde":
        assert search.suggest(tid) is not None
    search.on_trial_complete("a", {"quality": 3.0, "params": 10.0, "final": 1.0})
    search.on_trial_complete("b", {"quality": 3.0, "params": 10.0, "final": 0.0})  # stopped early
    search.on_trial_complete("c", {"quality": 2.0, "params": 9.0, "final": 0.0}, error=True)  # crashed
    search.on_trial_complete("d", {"quality": math.nan, "params": 9.0, "final": 1.0})  # final but not finite
    search.on_trial_complete("e", None, error=True)
    assert states(search) == ["COMPLETE", "PRUNED", "FAIL", "FAIL", "FAIL"]
    assert search._ot_study.get_trials()[0].values == [3.0, 10.0]


def test_concurrency_is_limited_by_unfinished_trials(tmp_path):
    search = make_search(tmp_path, max_concurrent=2)
    assert search.suggest("a") and search.suggest("b")
    assert search.suggest("c") is None
    search.on_trial_complete("a", {"quality": 1.0, "params": 1.0, "final": 1.0})
    assert search.suggest("c") is not None


def test_restore_closes_study_trials_the_saved_searcher_never_knew(tmp_path):
    search = make_search(tmp_path)
    search.suggest("a")
    search.save(str(tmp_path / "searcher.pkl"))
    search.suggest("b")  # asked after the last save: the driver dies here
    restored = make_search(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert states(restored) == ["RUNNING", "FAIL"]  # "a" is resumed by Tune and told later
    restored.on_trial_complete("a", {"quality": 1.0, "params": 1.0, "final": 1.0})
    assert states(restored) == ["COMPLETE", "FAIL"]


def test_a_retried_trial_that_finishes_is_added_to_the_study(tmp_path):
    search = make_search(tmp_path)
    search.suggest("a")
    search.on_trial_complete("a", None, error=True)
    search.on_trial_complete("a", {"quality": 1.0, "params": 2.0, "final": 1.0})  # --retry-failed
    trials = search._ot_study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].values == [1.0, 2.0]


def test_a_restored_searcher_does_not_propose_the_first_trials_again(tmp_path):
    """The sampler is rebuilt, not unpickled: from its bare seed it would repeat trial "a"."""
    search = make_search(tmp_path)
    first = [search.suggest(tid) for tid in "ab"]
    search.save(str(tmp_path / "searcher.pkl"))
    restored = make_search(tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("c") not in first
