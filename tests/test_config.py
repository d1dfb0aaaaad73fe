import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atp_ray.config import load_config
from atp_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED_RUN_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_validates(path):
    load_config(path)


def test_overrides_set_dotted_keys(tiny_model_dir):
    config = load_config(
        {"model": {"path": str(tiny_model_dir)}},
        ["atp.sparsity=0.45", "train.steps=7", "train.seed=3", f"model.path={tiny_model_dir}"],
    )
    assert (config.atp.sparsity, config.train.steps, config.train.seed) == (0.45, 7, 3)


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(
            {
                "model": {"path": str(tmp_path / "missing")},
                "atp": {"sparsity": 0.99, "surprise": 1},
                "train": {"lr": -1.0, "steps": 0},
            }
        )
    message = str(caught.value)
    for expected in [
        "atp.sparsity: input should be less than or equal to 0.95 (got 0.99)",
        "atp.surprise: unknown key (got 1)",
        "train.lr: input should be greater than 0 (got -1.0)",
        "train.steps: input should be greater than 0 (got 0)",
        f"model.path: no such folder, and not a hub id (got '{tmp_path / 'missing'}')",
    ]:
        assert expected in message
    assert len(caught.value.problems) == 5


def test_missing_model_path_and_unsupported_architecture(tmp_path):
    with pytest.raises(ConfigError, match="model: required"):
        load_config({"atp": {"sparsity": 0.3}})
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        load_config({"model": {"path": str(tmp_path)}})


def test_hub_ids_are_accepted_without_network():
    assert load_config({"model": {"path": "meta-llama/Meta-Llama-3-8B"}}).model.path == "meta-llama/Meta-Llama-3-8B"


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"path": "/nowhere"}, "atp": {"sparsity": 1.5}}))
    result = subprocess.run(
        [sys.executable, "-m", "atp_ray.cli", "train", "--config", str(bad), "train.steps=-1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for field in ("atp.sparsity", "train.steps", "model.path"):
        assert field in result.stderr


def _problems(raw: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(raw, overrides)
    return str(caught.value)


def test_malformed_override_does_not_hide_the_other_problems(tiny_model_dir):
    message = _problems({"model": {"path": str(tiny_model_dir)}}, ["atp.sparsity", "train.steps=-1"])
    assert "override 'atp.sparsity': expected dotted.key=value" in message
    assert "train.steps: input should be greater than 0 (got -1)" in message


def test_missing_data_file_is_reported_next_to_an_unknown_key(tiny_model_dir, tmp_path):
    missing = tmp_path / "gone.jsonl"
    message = _problems({"model": {"path": str(tiny_model_dir)}, "data": {"source": str(missing), "surprise": 1}})
    assert "data.surprise: unknown key (got 1)" in message
    assert f"data.source.path: no such file (got '{missing}')" in message


def test_lasso_ramp_must_start_after_the_control_phase(tiny_model_dir):
    message = _problems({"model": {"path": str(tiny_model_dir)}, "atp": {"control_fraction": 0.9, "lasso_ramp_fraction": 0.2}})
    assert "control_fraction + lasso_ramp_fraction must be at most 1" in message and "0.9 + 0.2" in message


def test_distributed_section_rules(tiny_model_dir, tmp_path):
    model = {"path": str(tiny_model_dir)}
    assert "set workers" in _problems({"model": model, "distributed": {"strategy": "zero3"}})
    assert "offload_params needs strategy zero3" in _problems(
        {"model": model, "distributed": {"workers": 2, "strategy": "zero2", "offload_params": True}}
    )
    assert "distributed.deepspeed_config: no such file" in _problems(
        {"model": model, "distributed": {"workers": 2, "strategy": "zero2", "deepspeed_config": str(tmp_path / "x.json")}}
    )
    config = load_config({"model": model}, ["distributed.workers=4", "distributed.strategy=zero2"])
    assert (config.distributed.workers, config.distributed.strategy) == (4, "zero2")


def test_embedded_config_and_two_step_are_accepted_under_zero3():
    """Importance scores read one gathered layer at a time, so ZeRO-3 takes the embedded
    config's importance prior and two-step as they are (tests/test_ray_train.py runs them)."""
    zero3 = ["distributed.workers=2", "distributed.strategy=zero3"]
    assert load_config(REPO / "configs" / "embedded.yaml", zero3).atp.importance_prior > 0
    assert load_config(REPO / "configs" / "embedded.yaml", [*zero3, "method=two-step"]).method == "two-step"


def test_config_error_survives_a_pickle_round_trip_with_its_problems():
    """Ray hands a worker's exception to the driver pickled: the problem list must come back whole."""
    import pickle

    err = ConfigError(["model.path: no such folder", "train.steps: must be positive"])
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and str(back) == str(err)


def test_method_names_match_the_mask_sources():
    """config keeps the method names so that it imports no recipe module; the recipe has one source per name."""
    from atp_ray.config import METHODS
    from atp_ray.training.mask_sources import MASK_SOURCES

    assert tuple(MASK_SOURCES) == METHODS
