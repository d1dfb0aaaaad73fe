"""A trial lost with its process is retried from its checkpoint; a diverged trial never is."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import yaml

from atp_ray.cli import main
from tests.conftest import tiny_run_config
from tests.test_search import study_states


def one_trial_space(tmp_path: Path, model_dir: Path, lr: float, steps: int) -> str:
    base = tiny_run_config(
        model_dir, train={"steps": steps, "log_every": 2, "checkpoint_every": 2, "eval_every": 2, "device": "cpu"}
    )
    base["data"]["max_documents"] = 200
    space = {
        "base": base,
        "knobs": {"atp.sparsity": {"uniform": [0.2, 0.6]}, "train.lr": {"choice": [0.001, 1e30]}},
        "objectives": [{"name": "quality"}, {"name": "params"}],
        "sampler": {"name": "random", "seed": 0},
        "trials": 1,
        "retries": 2,
        "resources": {"cpus_per_worker": 1},
        "points_to_evaluate": [{"atp.sparsity": 0.4, "train.lr": lr}],
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def trial_record(out: Path) -> dict:
    (path,) = (out / "trials").glob("*/trial.json")
    return json.loads(path.read_text())


def test_a_diverged_trial_is_failed_once_and_never_retried(ray_local, tiny_model_dir, tmp_path):
    out = tmp_path / "exp"
    assert main(["search", "--space", one_trial_space(tmp_path, tiny_model_dir, 1e30, 4), "--out", str(out)]) == 0
    record = trial_record(out)
    assert record["status"] == "FAILED" and "diverged" in record["failure_reason"]
    assert record["attempts"] == 1, "a diverged trial was retried"
    assert pd.read_csv(out / "report" / "trials.csv").status.tolist() == ["FAILED"]
    assert study_states(out) == ["FAIL"]


def _trial_processes() -> list[int]:
    """Pids of Ray worker processes running a Tune function trial (their title names it)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::ImplicitFunc"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_a_trial_whose_process_dies_is_retried_from_its_checkpoint(ray_local, tiny_model_dir, tmp_path):
    """SIGKILL the trial's process once its run has a checkpoint: Tune retries it, the run resumes."""
    out = tmp_path / "exp"
    killed: list[int] = []

    def kill_once_checkpointed() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if list((out / "trials").glob("*/run/checkpoint.pt")) and _trial_processes():
                for pid in _trial_processes():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_once_checkpointed, daemon=True)
    watcher.start()
    assert main(["search", "--space", one_trial_space(tmp_path, tiny_model_dir, 0.001, 12), "--out", str(out)]) == 0
    watcher.join(timeout=5)
    assert killed, "the trial's process was never found"
    record = trial_record(out)
    assert record["status"] == "COMPLETED" and record["attempts"] == 2
    (run,) = (out / "trials").glob("*/run")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12, "the retry continued the run, each step logged once"
    assert json.loads((run / "summary.json").read_text())["steps"] == 12
    assert study_states(out) == ["COMPLETE"]
