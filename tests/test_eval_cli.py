"""``atp-ray eval`` end to end on tiny local models: a dense folder and a masked ATP run folder."""

from __future__ import annotations

import json

import pytest
import yaml
from peft import LoraConfig, get_peft_model

from atp_ray.cli import main
from atp_ray.config import DataConfig
from atp_ray.data import encode_table, load_splits
from atp_ray.evaluate import perplexity
from atp_ray.masking import masked
from atp_ray.modeling import load_model, load_tokenizer
from atp_ray.run_folder import RunFolder
from atp_ray.structures import PruningSpace
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


@pytest.fixture
def run_dir(tiny_chat_model_dir, tmp_path):
    """A finished ATP run on the tiny model: config, LoRA adapter and a random hard mask."""
    folder = RunFolder(tmp_path / "run")
    folder.root.mkdir()
    data = {"source": write_jsonl(tmp_path / "d.jsonl", [{"text": f"note {i}"} for i in range(100)]), "seq_len": 16}
    config = {"model": {"path": str(tiny_chat_model_dir)}, "data": data, "train": {"seed": 3}}
    folder.config.write_text(yaml.safe_dump(config))
    base = load_model(str(tiny_chat_model_dir))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"])).save_pretrained(folder.adapter)
    space = PruningSpace.from_config(base.config)
    folder.write_mask(space, random_masks(space, seed=1))
    return folder


def test_eval_run_folder_scores_the_masked_model_on_its_held_out_data(run_dir, tmp_path):
    out = tmp_path / "run.json"
    assert main(["eval", str(run_dir.root), "--tasks", "domain-ppl", "--max-samples", "all", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "masked run" and report["settings"]["seed"] == 3

    config = yaml.safe_load(run_dir.config.read_text())
    model = load_model(config["model"]["path"])  # LoRA B starts at zero: the merged model equals the base
    space = PruningSpace.from_config(model.config)
    masks = run_dir.read_mask(space)
    data = DataConfig.model_validate(config["data"])
    held_out = encode_table(load_splits(data, seed=3).evaluation, data, load_tokenizer(config["model"]["path"]))
    with masked(model, space, masks):
        expected = perplexity(model, held_out).values["perplexity"]
    assert report["tasks"]["domain-ppl"]["values"]["perplexity"] == pytest.approx(expected)
    assert expected != pytest.approx(perplexity(model, held_out).values["perplexity"])

    dense = sum(p.numel() for p in model.parameters())
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


def test_compressed_folder_scores_like_its_masked_run(run_dir, tmp_path):
    """The compressed model is the masked one, smaller: same held-out perplexity, fewer parameters."""
    compressed = tmp_path / "compressed"
    assert main(["compress", str(run_dir.root), "--out", str(compressed)]) == 0
    reports = {}
    for name, path in (("run", run_dir.root), ("compressed", compressed)):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(path), "--tasks", "domain-ppl,latency", "--max-samples", "all", "--out", str(out)]) == 0
        reports[name] = json.loads(out.read_text())
    assert reports["compressed"]["kind"] == "compressed"
    run_ppl = reports["run"]["tasks"]["domain-ppl"]["values"]["perplexity"]
    assert reports["compressed"]["tasks"]["domain-ppl"]["values"]["perplexity"] == pytest.approx(run_ppl, rel=1e-4)
    assert reports["compressed"]["parameters"] <= reports["run"]["parameters"]
