"""Compressing an elastic run (issue 24): one exact model per budget, from one run folder."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FinishedRun, TINY, tiny_run_config
from safetensors.torch import load_file

import atp_ray.compression.compress as compress
from atp_ray.cli import main
from atp_ray.compression.compress import (
    budget_folder,
    compress_budgets,
    compress_run,
    count_params,
    is_compressed,
    load_compressed,
    read_record,
    run_budgets,
)
from atp_ray.config import load_config
from atp_ray.errors import CompressionError, RunFolderError
from atp_ray.pruning.masking import masked
from atp_ray.runtime.modeling import load_model, load_run_model
from atp_ray.runtime.run_folder import RunFolder, budget_key
from atp_ray.training.atp import run_atp

BUDGETS = (0.2, 0.5)


@dataclass
class ElasticRun:
    folder: RunFolder
    base: str  # the base model's folder


@pytest.fixture(scope="module")
def elastic_run(tiny_model_dir, tmp_path_factory) -> ElasticRun:
    """A real, short elastic ATP run of the tiny Llama for the budgets 0.2 and 0.5."""
    raw = tiny_run_config(tiny_model_dir, atp={"sparsity": list(BUDGETS)}, train={"steps": 12})
    folder = RunFolder(tmp_path_factory.mktemp("elastic") / "run")
    run_atp(load_config(raw), folder.root)
    return ElasticRun(folder, str(tiny_model_dir))


def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def masked_logits(run_dir: Path, sparsity: float | None) -> torch.Tensor:
    model, space, masks = load_run_model(run_dir, sparsity=sparsity)
    with masked(model, space, masks):
        return model(input_ids()).logits


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def assert_nothing_in(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


# -- every budget, exact ----------------------------------------------------------------------
def test_each_budget_compresses_to_its_masked_model(elastic_run, tmp_path):
    """Each folder is an ordinary compressed model whose parameter count is the dense count
    less what its budget's mask removes, and whose logits are the masked model's."""
    run = elastic_run.folder.root
    records = compress_budgets(run, tmp_path / "models")
    assert sorted(records) == list(BUDGETS)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["sparsity-0.2", "sparsity-0.5"]
    dense = count_params(load_model(elastic_run.base))
    saved = json.loads(elastic_run.folder.mask.read_text())["budgets"]
    summary = json.loads(elastic_run.folder.summary.read_text())["budgets"]
    for budget, record in records.items():
        folder = budget_folder(tmp_path / "models", budget)
        assert folder == tmp_path / "models" / f"sparsity-{budget_key(budget)}"
        assert read_record(folder) == record
        model, space, masks = load_run_model(run, sparsity=budget)
        removed = space.prunable_params - int(space.kept_params(masks))
        assert record.dense_params == dense
        assert record.params == count_params(load_compressed(folder)) == dense - removed
        assert record.sparsity == pytest.approx(saved[budget_key(budget)]["sparsity"])
        assert record.params == summary[budget_key(budget)]["params"]
        with torch.no_grad():
            assert_close_logits(load_compressed(folder)(input_ids()).logits, masked_logits(run, budget))
    assert records[0.5].params < records[0.2].params


def test_one_budget_alone_is_the_same_model(elastic_run, tmp_path):
    """compress_run at one budget (its own load and merge) writes the very tensors that
    compress_budgets cuts from its shared, copied model."""
    run = elastic_run.folder.root
    all_budgets = compress_budgets(run, tmp_path / "models", sparsities=[0.5, 0.2])
    for budget in BUDGETS:
        alone = tmp_path / f"alone-{budget}"
        assert compress_run(run, alone, sparsity=budget) == all_budgets[budget]
        shared = load_file(budget_folder(tmp_path / "models", budget) / "model.safetensors")
        single = load_file(alone / "model.safetensors")
        assert shared.keys() == single.keys()
        assert all(torch.equal(shared[name], single[name]) for name in shared)


# -- budgets that the run does not have -----------------------------------------------------
def test_an_elastic_run_needs_one_of_its_budgets(elastic_run, tmp_path):
    run, out = elastic_run.folder.root, tmp_path / "out"
    with pytest.raises(CompressionError, match=r"0\.2, 0\.5"):
        compress_run(run, out)
    with pytest.raises(CompressionError, match=r"budgets 0\.2, 0\.5 has no mask at sparsity 0\.3"):
        compress_run(run, out, sparsity=0.3)
    with pytest.raises(CompressionError, match=r"no mask at sparsity 0\.35"):
        compress_budgets(run, out, sparsities=[0.2, 0.35])
    assert_nothing_in(out)  # checked before any budget is written
    with pytest.raises(RunFolderError, match=r"0\.2, 0\.5"):
        load_run_model(run)


def test_a_single_run_takes_only_its_own_target(finished_run: FinishedRun, tmp_path):
    run = finished_run.folder.root  # target 0.4
    with pytest.raises(CompressionError, match=r"target sparsity 0\.4; it cannot be compressed at 0\.3"):
        compress_run(run, tmp_path / "out", sparsity=0.3)
    assert_nothing_in(tmp_path / "out")
    record = compress_run(run, tmp_path / "at-target", sparsity=0.4 + 1e-9)
    assert record == read_record(tmp_path / "at-target")


def test_run_budgets(elastic_run, finished_run: FinishedRun, tmp_path):
    assert run_budgets(elastic_run.folder.root) == BUDGETS
    assert run_budgets(finished_run.folder.root) == (0.4,)  # a single run: its target
    lora = tmp_path / "lora"
    shutil.copytree(finished_run.folder.root, lora)
    (lora / "config.yaml").write_text(yaml.safe_dump({**finished_run.folder.read_config(), "method": "lora"}))
    assert run_budgets(lora) == (0.0,)  # a dense LoRA run prunes nothing, whatever atp.sparsity says


# -- crash safety and resume ------------------------------------------------------------------
def test_a_crash_leaves_whole_folders_and_a_rerun_does_only_the_rest(elastic_run, tmp_path, monkeypatch):
    run, out = elastic_run.folder.root, tmp_path / "models"
    write_record = compress.atomic_write_json

    def crash_at_the_second_record(path, obj):
        if "0.5" in str(path):
            raise KeyboardInterrupt  # its weights are on disk, its compression.json is not
        write_record(path, obj)

    with monkeypatch.context() as patch:
        patch.setattr(compress, "atomic_write_json", crash_at_the_second_record)
        with pytest.raises(KeyboardInterrupt):
            compress_budgets(run, out)
    assert is_compressed(out / "sparsity-0.2")
    assert not (out / "sparsity-0.5").exists()
    first = (out / "sparsity-0.2" / "model.safetensors").stat().st_mtime_ns

    loads = []
    load = compress.load_run_model
    monkeypatch.setattr(compress, "load_run_model", lambda *a, **k: loads.append(k) or load(*a, **k))
    records = compress_budgets(run, out)
    assert loads == [{"sparsity": 0.5}]  # one load, for the missing budget only
    assert (out / "sparsity-0.2" / "model.safetensors").stat().st_mtime_ns == first
    assert sorted(p.name for p in out.iterdir()) == ["sparsity-0.2", "sparsity-0.5"]  # no .partial left
    assert records == {b: read_record(budget_folder(out, b)) for b in BUDGETS}
    assert compress_budgets(run, out) == records and len(loads) == 1  # all there: nothing loads


# -- command line -----------------------------------------------------------------------------
def test_cli_compresses_every_budget_or_the_ones_asked(elastic_run, tmp_path, capsys):
    run = str(elastic_run.folder.root)
    assert main(["compress", run, "--out", str(tmp_path / "all")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, budget in zip(lines, BUDGETS):
        record = read_record(tmp_path / "all" / f"sparsity-{budget}")
        assert str(tmp_path / "all" / f"sparsity-{budget}") in line
        assert f"params={record.params:,}" in line and f"sparsity={record.sparsity:.4f}" in line

    assert main(["compress", run, "--out", str(tmp_path / "one"), "--sparsity", "0.5"]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["sparsity-0.5"]
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["compress", run, "--out", str(tmp_path / "both"), "--sparsity", "all"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.3", r"budgets 0\.2, 0\.5 has no mask at sparsity 0\.3"),
        ("0.2,0.7", r"no mask at sparsity 0\.7"),
        ("half", r"--sparsity: expected sparsities separated by commas .* got 'half'"),
        ("0.2,", r"--sparsity: expected .* got '0\.2,'"),
    ],
)
def test_cli_refuses_bad_sparsities_in_one_line(elastic_run, tmp_path, capsys, value, message):
    out = tmp_path / "out"
    assert main(["compress", str(elastic_run.folder.root), "--out", str(out), "--sparsity", value]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("atp-ray compress: error: ") and "Traceback" not in line
    assert re.search(message, line), line
    assert_nothing_in(out)


def test_cli_single_run_sparsity_must_be_its_target(finished_run: FinishedRun, tmp_path, capsys):
    run = str(finished_run.folder.root)
    for value in ("0.3", "0.4,0.5"):
        assert main(["compress", run, "--out", str(tmp_path / "x"), "--sparsity", value]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("atp-ray compress: error: ") and "single run" in line
    assert main(["compress", run, "--out", str(tmp_path / "model"), "--sparsity", "0.4"]) == 0
    assert is_compressed(tmp_path / "model")  # a single run's --out is the model folder itself
    assert str(tmp_path / "model") in capsys.readouterr().out
