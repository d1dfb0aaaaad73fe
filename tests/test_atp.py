import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import tiny_run_config
from safetensors.torch import load_file
from transformers import AutoConfig

from atp_ray.atp import ATPRecipe, run_atp
from atp_ray.config import load_config
from atp_ray.errors import RunFolderError
from atp_ray.run_folder import RunFolder
from atp_ray.structures import PruningSpace


def _rows(folder: RunFolder) -> list[dict]:
    return [json.loads(line) for line in folder.metrics.read_text().splitlines()]


def test_short_run_reaches_target_and_writes_its_folder(tiny_model_dir, tmp_path):
    config = load_config(tiny_run_config(tiny_model_dir))
    summary = run_atp(config, tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    assert abs(summary["sparsity"] - 0.4) <= 0.03
    assert json.loads(folder.mask.read_text())["sparsity"] == pytest.approx(summary["sparsity"])
    assert (folder.adapter / "adapter_config.json").is_file()
    assert load_file(folder.generator)
    assert folder.read_config() == config.to_dict()
    rows = _rows(folder)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    for row in rows:
        assert {"step", "loss", "ratio_loss", "sparsity", "group_lasso", "lr", "generator_lr"} <= set(row)
    assert rows[-1]["phase"] == "frozen" and rows[0]["phase"] == "control"
    assert not folder.checkpoint.exists()  # a finished run keeps its outputs, not its training state
    assert summary["eval_loss"] > 0


def _cut_to_kept_norm_ratio(tmp_path, tiny_model_dir, lasso_weight: float) -> float:
    """Mean LoRA-A column norm of down_proj over cut channels, relative to kept ones, after a run."""
    raw = tiny_run_config(tiny_model_dir, atp={"lasso_weight": lasso_weight}, train={"lr": 1e-2})
    folder = RunFolder(tmp_path / f"lasso-{lasso_weight}")
    run_atp(load_config(raw), folder.root)
    space = PruningSpace.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    weights = load_file(folder.adapter / "adapter_model.safetensors")
    ratios = []
    for layer in range(space.num_layers):
        down_a = next(v for k, v in weights.items() if f"layers.{layer}.mlp.down_proj.lora_A" in k)
        channels = space.mlp_mask(folder.read_mask(space), layer)
        norms = down_a.norm(dim=0)
        ratios.append(norms[channels == 0].mean() / norms[channels == 1].mean())
    return float(sum(ratios) / len(ratios))


def test_group_lasso_empties_lora_of_cut_units(tiny_model_dir, tmp_path):
    """Side by side: the lasso shrinks the LoRA weights of cut channels far below a lasso-free run."""
    without = _cut_to_kept_norm_ratio(tmp_path, tiny_model_dir, 0.0)
    with_lasso = _cut_to_kept_norm_ratio(tmp_path, tiny_model_dir, 1.0)
    assert with_lasso < 0.5 * without


def test_run_is_reproducible_from_its_seed(tiny_model_dir, tmp_path):
    raw = tiny_run_config(tiny_model_dir, train={"steps": 12})
    first = run_atp(load_config(raw), tmp_path / "a")
    second = run_atp(load_config(raw), tmp_path / "b")
    assert first == second


def test_interrupted_run_resumes_where_it_stopped(tiny_model_dir, tmp_path, monkeypatch):
    """Stop right after the step-20 checkpoint, resume, and match an uninterrupted run exactly."""
    raw = tiny_run_config(tiny_model_dir)
    reference = run_atp(load_config(raw), tmp_path / "reference")

    save = ATPRecipe._checkpoint

    def crash_after_checkpoint(recipe):
        save(recipe)
        if recipe.step == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(ATPRecipe, "_checkpoint", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_atp(load_config(raw), tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    assert torch.load(folder.checkpoint, weights_only=True)["step"] == 20
    monkeypatch.setattr(ATPRecipe, "_checkpoint", save)
    resumed = run_atp(load_config(raw), tmp_path / "run")
    assert resumed == reference
    assert [r["step"] for r in _rows(folder)] == list(range(5, 41, 5))
    reference_mask = json.loads(RunFolder(tmp_path / "reference").mask.read_text())
    assert json.loads(folder.mask.read_text()) == reference_mask


def test_killed_cli_run_continues_its_step_count(tiny_model_dir, tmp_path):
    """A real SIGKILL of `atp-ray train`: the rerun starts from the checkpoint, not from zero."""
    config_file = tmp_path / "run.yaml"
    raw = tiny_run_config(tiny_model_dir, train={"steps": 300, "checkpoint_every": 10, "log_every": 10})
    config_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "atp_ray.cli", "train", "--config", str(config_file), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = RunFolder(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not folder.checkpoint.exists():
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(folder.checkpoint, weights_only=True)["step"]
    assert 10 <= killed_at < 300

    result = subprocess.run(command + ["train.steps=" + str(killed_at + 20)], capture_output=True, text=True)
    assert result.returncode == 2 and "different config" in result.stderr  # a changed config is refused
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed {out} at step {killed_at}" in result.stderr
    steps = [r["step"] for r in _rows(folder)]
    assert steps == sorted(set(steps)) and steps[-1] == 300


def test_finished_run_folder_is_not_overwritten(tiny_model_dir, tmp_path):
    raw = tiny_run_config(tiny_model_dir, train={"steps": 3})
    run_atp(load_config(raw), tmp_path / "run")
    with pytest.raises(RunFolderError, match="finished run"):
        run_atp(load_config(raw), tmp_path / "run")


def test_bf16_autocast_run(tiny_model_dir, tmp_path):
    """train.precision=bf16 runs the forward passes under bf16 autocast (on the CPU here)."""
    raw = tiny_run_config(tiny_model_dir, train={"steps": 4, "precision": "bf16"})
    summary = run_atp(load_config(raw), tmp_path / "run")
    rows = _rows(RunFolder(tmp_path / "run"))
    assert all(math.isfinite(r["loss"]) for r in rows) and math.isfinite(summary["eval_loss"])
