"""Every bench script's --quick (or smallest) form runs and prints its table (numbers not asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_run_config

from atp_ray.config import load_config
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import run_atp


def _run(monkeypatch, module, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    threads = torch.get_num_threads()
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)  # a bench's --threads must not slow the tests after it


def test_atp_cost_quick_prints_its_ratio_table(monkeypatch, capsys):
    from bench import atp_cost

    _run(monkeypatch, atp_cost, ["--quick", "--threads", "1", "--variant", "every-2=atp.generator_every=2"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows] == ["run", "lora", "atp", "every-2"]
    assert [r[4].strip() for r in rows[1:]][0] == "**1.00x**"  # the reference over itself
    assert all(cell.strip().endswith("x**") for r in rows[1:] for cell in r[4:6])  # wall and train ratios


def test_atp_vs_two_step_quick_prints_every_method(monkeypatch, capsys, tmp_path):
    from bench import atp_vs_two_step

    # One seed keeps the test short; the script's own default is two seeds.
    _run(monkeypatch, atp_vs_two_step, ["--quick", "--seeds", "0", "--threads", "1", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")][1:]
    methods = ["dense lora", "atp", "atp + distill", "atp mask + tune", "two-step taylor", "two-step taylor + distill"]
    assert [r[0] for r in rows] == methods
    # Each method's calibration is in the table: quick two-step scores 2 batches of 4 blocks once, protected.
    two_step, atp = "8 once, protect 0.5", "2 per update (+4 once, prior)"
    assert [r[2] for r in rows] == ["-", atp, atp, "the atp run's mask", two_step, two_step]
    # "atp mask + tune" tuned the atp run's final mask from step 0.
    tuned, atp_run = RunFolder(tmp_path / "atp-mask-plus-tune-0.4-0"), RunFolder(tmp_path / "atp-0.4-0")
    assert json.loads(tuned.mask.read_text()) == json.loads(atp_run.mask.read_text())
    assert json.loads(tuned.summary.read_text())["freeze_step"] == 0
    assert "± " in out
    # The kept run folders: only "+ distill" runs trained with the KL term. Two-step's mask is
    # frozen from step 0; ATP distils once its mask is frozen (if this 4-step run gets there).
    distilled = {
        folder.name
        for folder in tmp_path.iterdir()
        if (folder / "metrics.jsonl").exists() and '"distill"' in (folder / "metrics.jsonl").read_text()
    }
    assert "two-step-taylor-plus-distill-0.4-0" in distilled
    assert distilled <= {"atp-plus-distill-0.4-0", "two-step-taylor-plus-distill-0.4-0"}
    atp_distill = RunFolder(tmp_path / "atp-plus-distill-0.4-0").read_config()["distill"]
    assert atp_distill["after_freeze"] and atp_distill["weight"] > 0
    # Their teacher is the seed's dense LoRA run (--teacher tuned, the default).
    for name in ["atp-plus-distill-0.4-0", "two-step-taylor-plus-distill-0.4-0"]:
        assert RunFolder(tmp_path / name).read_config()["distill"]["teacher_run"] == str((tmp_path / "dense-lora-0.0-0").resolve())


def test_elastic_front_quick_compares_one_elastic_run_with_dedicated_ones(monkeypatch, capsys, tmp_path):
    from bench import elastic_front

    _run(monkeypatch, elastic_front, ["--quick", "--threads", "1", "--draws", "sandwich", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    tables = [[]]
    for line in out.splitlines():
        if line.startswith("|"):
            tables[-1].append([c.strip() for c in line.split("|")[1:-1]])
        elif tables[-1]:
            tables.append([])
    per_budget, fronts = (table[2:] for table in tables if table)  # header and rule dropped
    assert [(r[0], r[1]) for r in per_budget] == [
        ("20%", "2 dedicated runs"), ("20%", "1 elastic run (sandwich)"),
        ("40%", "2 dedicated runs"), ("40%", "1 elastic run (sandwich)"),
    ]  # fmt: skip
    assert [r[0] for r in fronts] == ["2 dedicated runs", "1 elastic run (sandwich)"]
    assert fronts[0][-1] == "**1.00x**" and fronts[1][-1].endswith("x**")
    # Each model was compressed from its run: one per budget from one elastic run folder.
    assert sorted(p.name for p in tmp_path.glob("model-*") if p.is_dir()) == [
        "model-dedicated-0.2", "model-dedicated-0.4", "model-sandwich-0.2", "model-sandwich-0.4",
    ]  # fmt: skip
    assert json.loads((tmp_path / "elastic-sandwich" / "summary.json").read_text())["target_sparsities"] == [0.2, 0.4]


def test_atp_vs_two_step_runs_only_the_methods_asked(monkeypatch, capsys):
    from bench import atp_vs_two_step

    _run(monkeypatch, atp_vs_two_step, ["--quick", "--seeds", "0", "--threads", "1", "--methods", "atp"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["atp"]
    assert rows[0][-1].strip() == "n/a"  # retention needs dense LoRA
    with pytest.raises(SystemExit) as caught:  # a tuned teacher needs the dense LoRA run
        _run(monkeypatch, atp_vs_two_step, ["--quick", "--seeds", "0", "--methods", "atp + distill"])
    assert caught.value.code == 2 and "add 'dense lora' to --methods" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:  # ATP's mask needs the ATP run
        _run(monkeypatch, atp_vs_two_step, ["--quick", "--seeds", "0", "--methods", "atp mask + tune"])
    assert caught.value.code == 2 and "add 'atp' to --methods" in capsys.readouterr().err


def test_a_kept_run_saved_before_a_knob_existed_is_not_trained_again(finished_run, tmp_path):
    from bench._runs import finished_in

    kept = tmp_path / "kept"
    shutil.copytree(finished_run.folder.root, kept)
    saved = RunFolder(kept).read_config()
    assert finished_in(finished_run.raw, kept)
    # A run saved before atp.sparsity_control existed: the knob's default is that run.
    del saved["atp"]["sparsity_control"]
    RunFolder(kept).config.write_text(yaml.safe_dump(saved))
    assert finished_in(finished_run.raw, kept)
    # Another value is another run; so is a knob today's schema no longer knows.
    assert not finished_in({**finished_run.raw, "atp": {**finished_run.raw["atp"], "sparsity_control": "schedule"}}, kept)
    saved["atp"]["retired_knob"] = 1
    RunFolder(kept).config.write_text(yaml.safe_dump(saved))
    assert not finished_in(finished_run.raw, kept)


def test_atp_vs_two_step_refuses_a_kept_folder_of_another_run_before_training(monkeypatch, capsys, finished_run, tmp_path):
    from bench import atp_vs_two_step

    other = tmp_path / "atp-0.4-0"  # the folder the bench's atp run at 40%, seed 0 would use
    shutil.copytree(finished_run.folder.root, other)
    summary = RunFolder(other).summary.read_text()
    with pytest.raises(SystemExit) as caught:
        _run(monkeypatch, atp_vs_two_step, ["--quick", "--seeds", "0", "1", "--methods", "atp", "--keep", str(tmp_path)])
    assert str(other) in str(caught.value) and "another config" in str(caught.value)
    # Nothing trained: not seed 0's run, not seed 1's, and the kept run is as it was.
    assert not (tmp_path / "atp-0.4-1").exists() and RunFolder(other).summary.read_text() == summary


def test_atp_vs_two_step_scores_a_kept_run_once(monkeypatch, finished_run, tmp_path):
    from bench import _runs, atp_vs_two_step

    kept = tmp_path / "atp-0.4-0"
    shutil.copytree(finished_run.folder.root, kept)
    evaluations = []
    evaluate = _runs.run_eval
    monkeypatch.setattr(_runs, "run_eval", lambda *a, **kw: evaluations.append(a) or evaluate(*a, **kw))
    first = atp_vs_two_step.scored_run(kept, max_samples=4)
    assert atp_vs_two_step.scored_run(kept, max_samples=4) == first and len(evaluations) == 1
    atp_vs_two_step.scored_run(kept, max_samples=2)  # another sample count is scored anew
    summary = RunFolder(kept).summary
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "eval_loss": 0.0}))  # the run trained again
    atp_vs_two_step.scored_run(kept, max_samples=2)
    assert len(evaluations) == 3


def test_compress_speed_benches_a_finished_run(monkeypatch, capsys, tiny_model_dir, tmp_path):
    from bench import compress_speed

    run_atp(load_config(tiny_run_config(tiny_model_dir, train={"steps": 5})), tmp_path / "run")
    argv = ["--runs", str(tmp_path / "run"), "--channel-multiple", "8", "--repeats", "1", "--warmup", "0"]
    argv += ["--memory-probes", "0", "--seq-len", "16", "--batch", "2", "--new-tokens", "2", "--threads", "1"]
    _run(monkeypatch, compress_speed, argv)
    out = capsys.readouterr().out
    names = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][1:]
    assert names[0] == "dense" and names[1].startswith("run (") and names[2].startswith("run x8 (")


def test_train_overhead_quick_times_both_paths_and_the_cli(tiny_model_dir):
    """In a process of its own: the bench starts and stops its own Ray instances (the session's stays apart)."""
    argv = [sys.executable, "-m", "bench.train_overhead", "--quick", "--cli", "--model", str(tiny_model_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r[0].split(":")[0].strip() for r in rows] == [
        "direct (one process, imports paid)",
        "Ray Train, 1 worker",
        "Ray Train, 1 worker",
        "`atp-ray train` (a new process)",
        "`atp-ray train --workers 1` (a new process)",
    ]
    assert rows[0][2].strip() == rows[3][2].strip() == "1.00"  # each reference over itself
    assert all(float(r[1]) > 0 for r in rows)
