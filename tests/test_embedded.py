"""The embedded default end to end: real SmolLM2-135M on real HPO text (slow: run with -m slow)."""

import json
from pathlib import Path

import pytest

from atp_ray.atp import run_atp
from atp_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_embedded_config_runs_and_lands_on_target(tmp_path):
    config = load_config(REPO / "configs" / "embedded.yaml", ["train.steps=6", "atp.control_fraction=0.5"])
    summary = run_atp(config, tmp_path / "run")
    assert abs(summary["sparsity"] - config.atp.sparsity) <= 0.02
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6
