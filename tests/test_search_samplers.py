"""Every sampler name runs a real search; none is ever pickled (optuna 5.1's NSGA-II holds a lock).

Each search here is a real ``tune.Tuner`` over the tiny model: 2 trials of 2 steps.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import threading

import pandas as pd
import pytest
import yaml

from atp_ray.cli import main
from atp_ray.search import samplers
from atp_ray.search.samplers import SAMPLERS, SamplerFactory
from tests.conftest import tiny_run_config


def tiny_space(tmp_path, model_dir, sampler: str, trials: int = 2) -> str:
    base = tiny_run_config(
        model_dir, train={"steps": 2, "log_every": 1, "checkpoint_every": 2, "eval_every": 2, "device": "cpu"}
    )
    base["data"]["max_documents"] = 200
    space = {
        "base": base,
        "knobs": {"atp.sparsity": {"uniform": [0.2, 0.6]}, "atp.lasso_weight": {"loguniform": [0.001, 0.1]}},
        "objectives": [{"name": "quality"}, {"name": "params"}],
        "sampler": {"name": sampler, "seed": 0},
        "trials": trials,
        "concurrency": 2,
        "resources": {"cpus_per_worker": 1},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


class LockedSampler:
    """Wraps a sampler and holds a thread lock, as optuna 5.1's NSGAIISampler does."""

    def __new__(cls, inner):
        inner._held = threading.Lock()
        return inner


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_factory_pickles_and_builds_a_seeded_sampler(name):
    factory = SamplerFactory(name, seed=3, population_size=4)
    assert pickle.loads(pickle.dumps(factory)) == factory
    assert type(factory()) is type(factory())


def test_an_unknown_sampler_name_is_refused():
    with pytest.raises(ValueError, match="unknown name 'cmaes'"):
        SamplerFactory("cmaes", 0, 2)


# nsga2 (demo.yaml, healthcare.yaml) and tpe (legal.yaml) run real searches in test_shipped_spaces
SHIPPED_SAMPLERS = {"nsga2", "tpe"}


def test_every_sampler_runs_a_real_search_here_or_in_a_shipped_space():
    assert set(SAMPLERS) == SHIPPED_SAMPLERS | {"gp", "random"}
    from tests.test_shipped_spaces import SPACES

    shipped = {yaml.safe_load(path.read_text())["sampler"]["name"] for path in SPACES.glob("*.yaml")}
    assert shipped == SHIPPED_SAMPLERS


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - SHIPPED_SAMPLERS))
def test_every_sampler_runs_a_real_search(name, ray_local, tiny_model_dir, tmp_path):
    out = tmp_path / "exp"
    assert main(["search", "--space", tiny_space(tmp_path, tiny_model_dir, name), "--out", str(out)]) == 0
    table = pd.read_csv(out / "report" / "trials.csv")
    assert table.status.tolist() == ["COMPLETED"] * 2
    assert table["knob.atp.sparsity"].nunique() == 2  # the sampler proposed two different trials


def test_a_sampler_that_does_not_pickle_still_searches_and_resumes(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """The failure of optuna 5.1 made on purpose: whatever the installed optuna, a sampler holding
    a lock must never be pickled (Tuner start, experiment checkpoints, resume)."""
    inner = samplers.SAMPLERS["nsga2"]
    locked = dataclasses.replace(inner, build=lambda seed, pop: LockedSampler(inner.build(seed, pop)))
    monkeypatch.setitem(samplers.SAMPLERS, "nsga2", locked)
    with pytest.raises(TypeError, match="pickle"):  # the stand-in really is unpicklable
        pickle.dumps(SamplerFactory("nsga2", 0, 2)())
    out = tmp_path / "exp"
    assert main(["search", "--space", tiny_space(tmp_path, tiny_model_dir, "nsga2"), "--out", str(out)]) == 0
    assert main(["resume", str(out)]) == 0  # restores the searcher from Tune's saved state
    assert main(["resume", str(out)]) == 0  # and again, from the state the first resume saved
    assert pd.read_csv(out / "report" / "trials.csv").status.tolist() == ["COMPLETED"] * 2


NEWEST_OPTUNA_SEARCH = """
import sys
import optuna
from atp_ray.cli import main
print("optuna", optuna.__version__, optuna.__file__, flush=True)
for space, out in zip(sys.argv[1::2], sys.argv[2::2]):
    assert main(["search", "--space", space, "--out", out]) == 0, space
"""


@pytest.mark.slow
def test_every_sampler_searches_with_the_newest_optuna_the_registry_serves(ray_local, tiny_model_dir, tmp_path):
    """The next optuna release, before it reaches the lock: installed beside the venv, first on the path."""
    newest = tmp_path / "newest"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(newest), "optuna"],
        check=True, timeout=600,
    )
    version = next(newest.glob("optuna-*.dist-info")).name.removesuffix(".dist-info").split("-")[1]
    args = []
    for name in SAMPLERS:
        (tmp_path / name).mkdir()
        args += [tiny_space(tmp_path / name, tiny_model_dir, name), str(tmp_path / name / "exp")]
    env = {**os.environ, "PYTHONPATH": str(newest), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-c", NEWEST_OPTUNA_SEARCH, *args], env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"optuna {version} {newest}" in done.stdout
    for name in SAMPLERS:
        table = pd.read_csv(tmp_path / name / "exp" / "report" / "trials.csv")
        assert table.status.tolist() == ["COMPLETED"] * 2, name
