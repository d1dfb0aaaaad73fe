"""The ATP recipe on the tiny model: its run folder, exact resume, the generator, schedules, bf16."""

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
from conftest import FinishedRun, make_tiny_model, make_tiny_tokenizer, tiny_run_config
from safetensors.torch import load_file
from transformers import AutoConfig

from atp_ray.config import load_config
from atp_ray.errors import RunFolderError
from atp_ray.pruning.generator import PruningGenerator
from atp_ray.pruning.structures import PruningSpace, UnitKind
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import run_atp


def _rows(folder: RunFolder) -> list[dict]:
    return [json.loads(line) for line in folder.metrics.read_text().splitlines()]


def _outputs(folder: RunFolder) -> dict:
    """Everything a finished run leaves behind, wall-clock times left out."""
    return {
        "summary": json.loads(folder.summary.read_text()),
        "mask": json.loads(folder.mask.read_text()),
        "adapter": load_file(folder.adapter / "adapter_model.safetensors"),
        "generator": load_file(folder.generator),
        "metrics": [{k: v for k, v in row.items() if k != "elapsed_s"} for row in _rows(folder)],
    }


def assert_same_run(folder: RunFolder, reference: RunFolder) -> None:
    """Bit-identical outputs: summary, mask, adapter and generator weights, every metrics row."""
    got, want = _outputs(folder), _outputs(reference)
    for key in ("summary", "mask", "metrics"):
        assert got[key] == want[key], key
    for key in ("adapter", "generator"):
        assert got[key].keys() == want[key].keys()
        for name, tensor in want[key].items():
            assert torch.equal(got[key][name], tensor), name


def _stop_after_checkpoint(monkeypatch, count: int) -> None:
    """Raise KeyboardInterrupt right after the ``count``-th checkpoint is on disk."""
    save = RunFolder.save_checkpoint
    saved = []

    def save_then_stop(self, state):
        save(self, state)
        saved.append(1)
        if len(saved) == count:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "save_checkpoint", save_then_stop)


def noise_free_sparsity(raw: dict, generator_state: dict) -> float:
    """Sparsity of the generator's noise-free mask, rebuilt from saved generator weights."""
    atp = load_config(raw).atp
    space = PruningSpace.from_config(AutoConfig.from_pretrained(raw["model"]["path"]))
    generator = PruningGenerator(space, width=atp.generator_width, temperature=atp.temperature, base=atp.base)
    generator.load_state_dict(generator_state)
    return space.sparsity(generator.deterministic_masks())


def test_short_run_reaches_target_and_writes_its_folder(finished_run: FinishedRun):
    folder, summary = finished_run.folder, finished_run.summary
    assert abs(summary["sparsity"] - 0.4) <= 0.03
    assert json.loads(folder.mask.read_text())["sparsity"] == pytest.approx(summary["sparsity"])
    assert (folder.adapter / "adapter_config.json").is_file()
    assert load_file(folder.generator)
    assert folder.read_config() == load_config(finished_run.raw).to_dict()
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


# -- exact resume -----------------------------------------------------------------------------
@pytest.mark.parametrize("checkpoints, phase", [(1, "control"), (3, "frozen")])
def test_interrupted_run_resumes_exactly(finished_run: FinishedRun, tmp_path, monkeypatch, checkpoints, phase):
    """Stop after the step-10 checkpoint (control phase) or the step-30 one (mask frozen at 22), resume,
    and end bit-identical to the uninterrupted run: generator, its optimizer, tolerance count,
    mask noise, frozen mask, LoRA, schedules and metrics all carried over."""
    stop_step = checkpoints * finished_run.raw["train"]["checkpoint_every"]
    assert {r["step"]: r["phase"] for r in _rows(finished_run.folder)}[stop_step] == phase
    folder = RunFolder(tmp_path / "run")
    with monkeypatch.context() as patch:
        _stop_after_checkpoint(patch, checkpoints)
        with pytest.raises(KeyboardInterrupt):
            run_atp(load_config(finished_run.raw), folder.root)
    assert not folder.is_finished() and folder.load_checkpoint()["step"] == stop_step
    assert run_atp(load_config(finished_run.raw), folder.root) == finished_run.summary
    assert_same_run(folder, finished_run.folder)


def test_killed_cli_run_resumes_exactly(finished_run: FinishedRun, tmp_path):
    """A real SIGKILL of `atp-ray train` after its first checkpoint: the rerun continues from that
    checkpoint and ends bit-identical to the uninterrupted run."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(finished_run.raw))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "atp_ray.cli", "train", "--config", str(config_file), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = RunFolder(out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not folder.checkpoint.exists() and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not folder.is_finished(), "the run ended before it could be killed"
    killed_at = folder.load_checkpoint()["step"]
    assert 10 <= killed_at < 40

    result = subprocess.run(command + ["train.steps=41"], capture_output=True, text=True)
    assert result.returncode == 2 and "different config" in result.stderr  # a changed config is refused
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed {out} at step {killed_at}" in result.stderr
    assert_same_run(folder, finished_run.folder)


def test_finished_run_folder_is_not_overwritten(tiny_model_dir, tmp_path):
    raw = tiny_run_config(tiny_model_dir, train={"steps": 3})
    run_atp(load_config(raw), tmp_path / "run")
    with pytest.raises(RunFolderError, match="finished run"):
        run_atp(load_config(raw), tmp_path / "run")


# -- the generator ----------------------------------------------------------------------------
def test_generator_learns_the_target_and_freezes_early(finished_run: FinishedRun, tmp_path):
    """Look at the generator itself: its ratio loss falls, its noise-free mask reaches the target
    and holds it, and the mask freezes before control ends. A generator that does not learn
    (learning rate 1e-9) freezes only after control and its extension, with its noise-free mask
    far from the target, and its summary says it missed."""
    raw = finished_run.raw
    target, tolerance = raw["atp"]["sparsity"], load_config(raw).atp.freeze_tolerance
    control_end = math.ceil(raw["train"]["steps"] * load_config(raw).atp.control_fraction)

    def at_freeze(folder: RunFolder) -> tuple[float, list[float]]:
        # The generator stops training at the freeze, so its saved weights are those of the freeze.
        gap = abs(noise_free_sparsity(raw, load_file(folder.generator)) - target)
        return gap, [r["ratio_loss"] for r in _rows(folder) if r["phase"] == "control"]

    learned_gap, learned_ratio = at_freeze(finished_run.folder)
    assert finished_run.summary["freeze_step"] < control_end
    assert learned_gap <= tolerance
    assert learned_ratio[-1] < 0.6 * learned_ratio[0]
    # At the step-10 checkpoint the generator was already on its way but not yet there.
    assert 0 < abs(noise_free_sparsity(raw, finished_run.checkpoints[10]["source"]["generator"]) - target) < target

    frozen_raw = {**raw, "atp": {**raw["atp"], "generator_lr": 1e-9}}
    folder = RunFolder(tmp_path / "still")
    summary = run_atp(load_config(frozen_raw), folder.root)
    still_gap, still_ratio = at_freeze(folder)
    # Control runs to its end and its bounded extension, then the freeze may move the mask by
    # the tolerance only: the run ends far from its target and says so.
    assert summary["freeze_step"] > control_end
    assert still_gap > 0.3 and still_gap > 10 * max(learned_gap, tolerance)
    assert min(still_ratio) > 2 * learned_ratio[-1]
    assert summary["reached_target"] is False and finished_run.summary["reached_target"] is True
    assert abs(summary["sparsity"] - summary["sparsity_at_control_end"]) <= tolerance + 0.03  # one unit's worth


# -- schedules and logging --------------------------------------------------------------------
def test_lr_warmup_cosine_lasso_ramp_and_log_windows(tiny_model_dir, tmp_path, monkeypatch):
    """Per-step rows (log_every 1) show the documented schedules exactly; a run logging every 4 steps,
    checkpointing every 3 and killed after the step-6 checkpoint (mid-window) logs the means of
    those per-step rows over each window."""
    steps, warmup, peak, lam, mult = 10, 3, 1e-3, 0.1, 5.0
    schedule = dict(
        atp={"lasso_weight": lam, "lasso_final_multiplier": mult, "lasso_ramp_fraction": 0.4},
        train={"steps": steps, "warmup_steps": warmup, "lr": peak},
    )
    per_step_raw = tiny_run_config(tiny_model_dir, **schedule)
    per_step_raw["train"] |= {"log_every": 1, "checkpoint_every": 100}
    run_atp(load_config(per_step_raw), tmp_path / "per-step")
    per_step = _rows(RunFolder(tmp_path / "per-step"))
    assert [r["step"] for r in per_step] == list(range(1, steps + 1))

    def lr(t: int) -> float:  # linear warm-up to the peak, then cosine down towards 10% of it
        if t < warmup:
            return peak * (t + 1) / warmup
        return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup))))

    def lasso(t: int) -> float:  # lambda, then a linear rise to lambda x mult over the last 40% of steps
        return lam if t < 6 else lam * (1 + (mult - 1) * (t + 1 - 6) / 4)

    assert [r["lr"] for r in per_step] == pytest.approx([lr(t) for t in range(steps)], rel=1e-6)
    assert [r["lasso_weight"] for r in per_step] == pytest.approx([lasso(t) for t in range(steps)], rel=1e-6)
    assert per_step[-1]["lasso_weight"] == pytest.approx(lam * mult)

    windowed_raw = tiny_run_config(tiny_model_dir, **schedule)
    windowed_raw["train"] |= {"log_every": 4, "checkpoint_every": 3}
    folder = RunFolder(tmp_path / "windowed")
    with monkeypatch.context() as patch:
        _stop_after_checkpoint(patch, 2)  # step 6: steps 5 and 6 are logged only at step 8
        with pytest.raises(KeyboardInterrupt):
            run_atp(load_config(windowed_raw), folder.root)
    run_atp(load_config(windowed_raw), folder.root)
    windowed = _rows(folder)
    assert [r["step"] for r in windowed] == [4, 8, 10]
    for row, (first, last) in zip(windowed, [(1, 4), (5, 8), (9, 10)]):
        window = per_step[first - 1 : last]
        latest = ("phase", "sparsity", "noise_free_sparsity")  # the window's last value, not a mean
        assert all(row[key] == window[-1][key] for key in latest)
        for key in set(row) - {"step", "elapsed_s", *latest}:
            values = [r[key] for r in window if key in r]
            assert row[key] == pytest.approx(sum(values) / len(values), rel=1e-6), (row["step"], key)


def test_lr_restart_at_freeze_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    """train.lr_after_freeze=restart: the control phase follows the run's cosine, the step after the
    freeze is back at the peak and a new cosine runs to the end; a run killed after the freeze and
    resumed ends identical to one that was not."""
    steps, peak = 40, 1e-3
    raw = tiny_run_config(tiny_model_dir, train={"lr_after_freeze": "restart", "log_every": 1, "checkpoint_every": 4})
    uninterrupted = RunFolder(tmp_path / "whole")
    summary = run_atp(load_config(raw), uninterrupted.root)
    freeze = summary["freeze_step"]
    assert 0 < freeze < 28, "the restart needs a freeze before the killed run's last checkpoint"

    def lr(t: int) -> float:
        start = 0 if t <= freeze else freeze + 1
        return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (t - start) / (steps - start))))

    rows = _rows(uninterrupted)
    assert [r["lr"] for r in rows] == pytest.approx([lr(t) for t in range(steps)], rel=1e-6)
    assert rows[freeze + 1]["lr"] == pytest.approx(peak) and rows[freeze]["lr"] < 0.9 * peak

    resumed = RunFolder(tmp_path / "resumed")
    with monkeypatch.context() as patch:
        _stop_after_checkpoint(patch, 7)  # step 28: after the freeze
        with pytest.raises(KeyboardInterrupt):
            run_atp(load_config(raw), resumed.root)
    run_atp(load_config(raw), resumed.root)
    whole, again = _outputs(uninterrupted), _outputs(resumed)
    assert again["metrics"] == whole["metrics"]
    assert all(torch.equal(again["adapter"][k], v) for k, v in whole["adapter"].items())


def test_bf16_autocast_takes_effect(tiny_model_dir, tmp_path):
    """train.precision=bf16: the decoder's MLPs compute in bfloat16 (CPU autocast here), in training
    and in the final evaluation, and the losses stay finite."""
    dtypes = set()

    def record(module, args, output):
        if type(module).__name__ == "LlamaMLP":
            dtypes.add(output.dtype)

    raw = tiny_run_config(tiny_model_dir, train={"steps": 4, "precision": "bf16"})
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        summary = run_atp(load_config(raw), tmp_path / "run")
    finally:
        handle.remove()
    assert dtypes == {torch.bfloat16}
    rows = _rows(RunFolder(tmp_path / "run"))
    assert all(math.isfinite(r["loss"]) for r in rows) and math.isfinite(summary["eval_loss"])


def test_importance_prior_starts_from_taylor_and_resumes_exactly(tmp_path, monkeypatch):
    """atp.importance_prior: channel 0 of layer 0 is dead (zero up row), so Taylor ranks it last; the
    prior the run saves says so and the run cuts it. Interrupted in control and resumed, the run ends
    bit-identical to an uninterrupted one (the prior is rebuilt, then the checkpoint's is loaded)."""
    model = make_tiny_model("llama-gqa")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0] = 0
    model.save_pretrained(tmp_path / "model")
    make_tiny_tokenizer().save_pretrained(tmp_path / "model")
    raw = tiny_run_config(tmp_path / "model", atp={"importance_prior": 5.0}, train={"steps": 20, "checkpoint_every": 5})
    reference = RunFolder(tmp_path / "reference")
    run_atp(load_config(raw), reference.root)
    prior = load_file(reference.generator)["prior_layer0_mlp_channel"]
    assert int(prior.argmin()) == 0 and float(prior[0]) < -5
    space = PruningSpace.from_config(model.config)
    assert reference.read_mask(space)[space.group(0, UnitKind.MLP_CHANNEL)][0] == 0

    folder = RunFolder(tmp_path / "run")
    with monkeypatch.context() as patch:
        _stop_after_checkpoint(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            run_atp(load_config(raw), folder.root)
    run_atp(load_config(raw), folder.root)
    assert_same_run(folder, reference)
