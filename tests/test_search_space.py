"""Search spaces: every shipped one validates; each kind of mistake gives one clear error (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from atp_ray.cli import main
from atp_ray.errors import ConfigError
from atp_ray.search.space import load_space

SPACES = sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))


def test_the_three_spaces_ship():
    assert {p.stem for p in SPACES} >= {"demo", "healthcare", "legal"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_validates(path):
    space, base = load_space(path)
    assert space.searched and space.objective_list()
    for point in space.points_to_evaluate:  # the seeded points build valid run configs
        assert space.run_config(point, base).model.path == base["model"]["path"]


def _space(tmp_path, **changes):
    raw = {
        "base": {"model": {"path": "embedded:smollm2-135m-instruct"}},
        "knobs": {"atp.sparsity": {"uniform": [0.2, 0.6]}, "atp.lasso_weight": {"loguniform": [0.001, 0.1]}},
        "objectives": [{"name": "quality"}, {"name": "params"}],
    }
    raw.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BAD = {
    "unknown key": (dict(knobs={"atp.sparsty": {"uniform": [0.2, 0.6]}}), "'atp.sparsty' is not a run-config key"),
    "bad distribution": (dict(knobs={"atp.sparsity": {"normal": [0.2, 0.6]}}), "knobs.atp.sparsity.normal: unknown key"),
    "empty range": (dict(knobs={"atp.sparsity": {"uniform": [0.6, 0.6]}}), "empty range: low must be below high"),
    "unknown objective": (dict(objectives=[{"name": "quality"}, {"name": "speed"}]), "unknown objective 'speed'"),
    "range the run config rejects": (dict(knobs={"atp.sparsity": {"uniform": [0.2, 1.5]}}), "atp.sparsity=1.5"),
    "point outside the space": (
        dict(points_to_evaluate=[{"atp.sparsity": 0.9, "atp.lasso_weight": 0.01}]),
        "atp.sparsity=0.9 is outside",
    ),
    "early stopping on a final-only objective": (
        dict(objectives=[{"name": "accuracy", "task": "hpo-term"}], early_stopping={"enabled": True}),
        "accuracy is only known at the end",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_space_gives_one_clear_error(case, tmp_path):
    changes, message = BAD[case]
    with pytest.raises(ConfigError) as err:
        load_space(_space(tmp_path, **changes))
    assert len(err.value.problems) == 1 and message in err.value.problems[0]


def test_search_with_a_bad_space_exits_2_before_ray_starts(tmp_path, capsys):
    import ray

    ray_was_up = ray.is_initialized()  # another test module's session Ray may be up
    path = _space(tmp_path, knobs={"atp.sparsity": {"uniform": [0.6, 0.2]}})
    assert main(["search", "--space", str(path), "--out", str(tmp_path / "exp")]) == 2
    assert "empty range" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists() and ray.is_initialized() == ray_was_up


def test_command_line_overrides_and_trials_apply_to_every_trial(tmp_path):
    space, base = load_space(_space(tmp_path), ["train.steps=7"], trials=3)
    assert space.trials == 3 and space.run_config({"atp.sparsity": 0.5}, base).train.steps == 7


def test_a_multi_worker_trial_driver_asks_for_the_head_only_where_a_cluster_offers_it(tmp_path):
    from atp_ray.search.tuner import DRIVER_CPU, trial_resources

    atp_cluster = {"CPU": 48.0, "GPU": 8.0, "search_driver": 1000.0}
    sharded, _ = load_space(_space(tmp_path, resources={"workers": 2, "gpus_per_worker": 1}))
    assert trial_resources(sharded, atp_cluster) == {"cpu": DRIVER_CPU, "search_driver": 1}
    assert trial_resources(sharded, {"CPU": 2.0}) == {"cpu": DRIVER_CPU}  # a laptop: no head to ask for
    in_process, _ = load_space(_space(tmp_path, resources={"workers": 1, "cpus_per_worker": 2, "gpus_per_worker": 1}))
    assert trial_resources(in_process, atp_cluster) == {"cpu": 2, "gpu": 1}  # it trains: it needs a GPU node


def test_relative_paths_in_the_base_config_are_made_absolute_for_the_trials(tmp_path, monkeypatch, tiny_model_dir):
    """Trials run in Tune actors whose working directory is their trial folder: relative paths must not reach them."""
    (tmp_path / "tiny").symlink_to(tiny_model_dir)
    (tmp_path / "notes.jsonl").write_text('{"text": "a note"}\n')
    monkeypatch.chdir(tmp_path)
    (tmp_path / "atp-run").mkdir()
    two_step = {"method": "two-step", "baseline": {"mask_run": "atp-run"}}
    path = _space(tmp_path, base={"model": {"path": "tiny"}, "data": {"source": "notes.jsonl"}, **two_step})
    _, base = load_space(path, ["distributed.storage_path=s3://bucket/runs"])
    assert base["model"]["path"] == str(tiny_model_dir.resolve())
    assert base["baseline"]["mask_run"] == str(tmp_path / "atp-run")
    assert base["data"]["source"] == {"kind": "file", "path": str(tmp_path / "notes.jsonl")}
    assert base["distributed"]["storage_path"] == "s3://bucket/runs"  # a URI, not a local path
    _, hub = load_space(_space(tmp_path, base={"model": {"path": "embedded:smollm2-135m-instruct"}}))
    assert hub["model"]["path"] == "embedded:smollm2-135m-instruct"


def test_early_stopping_grace_counts_held_out_evaluations_not_steps(tmp_path):
    """healthcare.yaml: grace 2 with an evaluation every 200 steps puts the first rung at step 400."""
    from atp_ray.search.experiment import Experiment
    from atp_ray.search.tuner import _scheduler

    space, base = load_space(Path(__file__).parents[1] / "search_spaces" / "healthcare.yaml")
    assert space.early_stopping.grace == 2 and base["train"]["eval_every"] == 200
    scheduler = _scheduler(Experiment(tmp_path, space, base, str(tmp_path)))
    assert scheduler.rungs.grace == 400


@pytest.mark.parametrize("where", ["knobs", "overrides"])
def test_a_space_makes_every_trial_elastic_with_a_fixed_sparsity_range(where, tmp_path):
    budgets = {"atp.sparsity": {"range": [0.2, 0.6], "points": 3}}
    knobs = {"atp.lasso_weight": {"loguniform": [0.001, 0.1]}}
    changes = dict(knobs={**knobs, **budgets}) if where == "knobs" else dict(knobs=knobs, overrides=budgets)
    space, base = load_space(_space(tmp_path, **changes))
    assert list(space.searched) == ["atp.lasso_weight"]
    config = space.run_config({"atp.lasso_weight": 0.01}, base)
    assert config.atp.elastic and config.atp.budgets == (0.2, 0.4, 0.6)
