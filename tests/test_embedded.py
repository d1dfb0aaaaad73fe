"""The embedded default end to end: real SmolLM2-135M on real HPO text (slow: run with -m slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atp_ray.config import load_config
from atp_ray.training.atp import run_atp

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_embedded_config_runs_and_lands_on_target(tmp_path):
    """Six steps are too few to climb to the shipped 0.3 (a short mask is never cut by more than
    the tolerance), but the importance prior starts the mask past 0.1: that target is passed
    at once, and the freeze gives the surplus back, onto the target."""
    overrides = ["train.steps=6", "atp.control_fraction=0.5", "atp.sparsity=0.1"]
    config = load_config(REPO / "configs" / "embedded.yaml", overrides)
    summary = run_atp(config, tmp_path / "run")
    assert summary["sparsity_at_control_end"] > 0.11 and summary["reached_target"]
    assert abs(summary["sparsity"] - 0.1) <= 0.02
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6


@pytest.mark.slow
def test_two_processes_converting_the_embedded_model_at_once_both_get_it(tmp_path):
    """A search's first trials may all ask for the model at once: one converts, the others wait for it."""
    code = "from atp_ray.models.embedded import embedded_model_path; print(embedded_model_path())"
    env = {**os.environ, "ATP_RAY_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert paths == {str(tmp_path / "cache" / "smollm2-135m-instruct")}
    assert (tmp_path / "cache" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert not (tmp_path / "cache" / "smollm2-135m-instruct.partial").exists()
