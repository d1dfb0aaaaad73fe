"""``atp-ray eval`` end to end on tiny local models: a dense folder and a masked ATP run folder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model

from atp_ray.cli import main
from atp_ray.config import DataConfig
from atp_ray.data.batches import encode_table, load_splits
from atp_ray.evaluation.evaluate import perplexity
from atp_ray.pruning.masking import masked
from atp_ray.pruning.structures import PruningSpace, UnitKind
from atp_ray.runtime.modeling import load_model, load_tokenizer
from atp_ray.runtime.run_folder import RunFolder
from conftest import random_masks


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_dense_folder_prints_a_table_and_writes_json(tiny_chat_model_dir, tmp_path, capsys):
    out = tmp_path / "report" / "eval.json"
    assert main(["eval", str(tiny_chat_model_dir), "--max-samples", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "dense"
    assert report["parameters"] == sum(p.numel() for p in load_model(str(tiny_chat_model_dir)).parameters())
    assert report["disk_bytes"] > 0
    assert set(report["tasks"]) == {"domain-ppl", "hpo-term", "icd10-chapter", "latency"}
    latency = report["tasks"].pop("latency")
    assert latency["values"]["prefill_ms"] > 0 and latency["values"]["decode_tokens_per_s"] > 0
    for result in report["tasks"].values():
        assert result["samples"] == 2 and result["values"]
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "size on disk:" in printed
    assert "hpo-term" in printed and "accuracy_norm" in printed


def adapted_model(run: RunFolder) -> PeftModel:
    """A run's base model with its adapter attached, not merged: what the masked run computed in training."""
    base = load_model(yaml.safe_load(run.config.read_text())["model"]["path"])
    return PeftModel.from_pretrained(base, run.adapter).eval()


def held_out_blocks(config: dict, seed: int):
    """The evaluation split of a run's own data, built here from its config."""
    data = DataConfig.model_validate(config["data"])
    return encode_table(load_splits(data, seed=seed).evaluation, data, load_tokenizer(config["model"]["path"]))


@pytest.fixture
def run_dir(tiny_chat_model_dir, tmp_path):
    """A finished ATP run on the tiny model: config, LoRA adapter and a random hard mask."""
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    data = {"source": write_jsonl(tmp_path / "d.jsonl", [{"text": f"note {i}"} for i in range(100)]), "seq_len": 16}
    config = {"model": {"path": str(tiny_chat_model_dir)}, "data": data, "train": {"seed": 3}}
    folder.config.write_text(yaml.safe_dump(config))
    base = load_model(str(tiny_chat_model_dir))
    adapted = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # peft starts B at zero, which would make the merge invisible
    adapted.save_pretrained(folder.adapter)
    space = PruningSpace.from_config(base.config)
    folder.write_mask(space, random_masks(space, seed=1))
    return folder


def test_eval_run_folder_scores_the_masked_model_on_its_held_out_data(run_dir, tmp_path):
    out = tmp_path / "run.json"
    assert main(["eval", str(run_dir.root), "--tasks", "domain-ppl", "--max-samples", "all", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "masked run" and report["settings"]["seed"] == 3

    config = yaml.safe_load(run_dir.config.read_text())
    model = adapted_model(run_dir)
    space = PruningSpace.from_config(model.config)
    masks = run_dir.read_mask(space)
    held_out = held_out_blocks(config, seed=3)
    with masked(model, space, masks):
        expected = perplexity(model, held_out).values["perplexity"]
    assert report["tasks"]["domain-ppl"]["values"]["perplexity"] == pytest.approx(expected)
    assert expected != pytest.approx(perplexity(model, held_out).values["perplexity"])

    dense = sum(p.numel() for p in load_model(config["model"]["path"]).parameters())
    assert report["parameters"] == dense - space.prunable_params + int(space.kept_params(masks))


def test_unknown_task_is_a_clean_error(tiny_chat_model_dir, capsys):
    assert main(["eval", str(tiny_chat_model_dir), "--tasks", "hpo-term,bogus"]) == 2
    assert "unknown task 'bogus'" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_embedded_model(tmp_path):
    out = tmp_path / "embedded.json"
    assert main(["eval", "embedded:smollm2-135m-instruct", "--max-samples", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["parameters"] == 134_515_008
    assert report["tasks"].pop("latency")["values"]["decode_tokens_per_s"] > 0
    assert all(result["samples"] == 2 for result in report["tasks"].values())


def test_bad_domain_fails_before_the_model_loads(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "domain-ppl", "--domain", "nowhere"]) == 2
    assert "--domain: Value error, expected 'builtin:NAME'" in capsys.readouterr().err


def test_trained_run_and_its_compressed_folder_score_the_masked_adapted_model(finished_run, tmp_path):
    """A real ATP run (trained, non-zero adapter) and its compressed folder, through `atp-ray eval`:
    both score what the masked model with its adapter attached (not merged) scores, closer
    than the gap one wrongly cut MLP channel makes (measured here, about 7e-5 relative)."""
    run = finished_run.folder
    compressed = tmp_path / "compressed"
    assert main(["compress", str(run.root), "--out", str(compressed)]) == 0
    reports = {}
    for name, path in (("run", run.root), ("compressed", compressed)):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(path), "--tasks", "domain-ppl,latency", "--max-samples", "all", "--out", str(out)]) == 0
        reports[name] = json.loads(out.read_text())
    assert reports["compressed"]["kind"] == "compressed"
    assert reports["compressed"]["parameters"] <= reports["run"]["parameters"]

    model = adapted_model(run)
    space = PruningSpace.from_config(model.config)
    masks = run.read_mask(space)
    held_out = held_out_blocks(finished_run.raw, finished_run.raw["train"].get("seed", 0))
    with masked(model, space, masks):
        expected = perplexity(model, held_out).values["perplexity"]
    one_more_cut = dict(masks)
    channels = space.group(1, UnitKind.MLP_CHANNEL)
    one_more_cut[channels] = masks[channels].clone()
    one_more_cut[channels][int(masks[channels].nonzero()[0])] = 0.0
    with masked(model, space, one_more_cut):
        one_unit_gap = abs(perplexity(model, held_out).values["perplexity"] / expected - 1)
    assert one_unit_gap > 0
    for report in reports.values():
        assert report["tasks"]["domain-ppl"]["values"]["perplexity"] == pytest.approx(expected, rel=one_unit_gap / 10)
