"""Evaluation tasks: shipped YAMLs, resolving specs, preparing and scoring each metric on a tiny model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from atp_ray.config import DataConfig, TaskConfig, load_task_config
from atp_ray.data.batches import encode_table, load_splits
from atp_ray.data.formats import required_columns
from atp_ray.errors import ConfigError, DataError
from atp_ray.evaluation.evaluate import perplexity
from atp_ray.evaluation.tasks import TaskContext, configured_task, domain_perplexity, resolve_tasks
from conftest import make_tiny_model

SHIPPED_TASKS = sorted((Path(__file__).parents[1] / "configs" / "tasks").glob("*.yaml"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def context(tokenizer, data=None, max_samples=None, max_length=128):
    return TaskContext(tokenizer, max_length, max_samples, batch_size=4, data=data or DataConfig(), seed=0)


# -- specs and shipped YAMLs ---------------------------------------------------------------


def test_tasks_are_shipped():
    assert {p.stem for p in SHIPPED_TASKS} >= {"pubmedqa", "mednli", "casehold", "billsum", "healthcaremagic"}


@pytest.mark.parametrize("path", SHIPPED_TASKS, ids=lambda p: p.stem)
def test_every_shipped_task_yaml_is_valid(path):
    config = load_task_config(path)
    assert config.name == path.stem
    assert required_columns(config.format)
    assert len(resolve_tasks([str(path)])) == 1


def test_every_bad_spec_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: builtin:hpo\nformat: {kind: text}\nmetric: accuracy\n")
    with pytest.raises(ConfigError) as err:
        resolve_tasks(["hpo-term", "nonsense", str(bad), str(tmp_path / "absent.yaml")])
    assert err.value.problems[0].startswith("--tasks: unknown task 'nonsense'; built-in: domain-ppl")
    assert "metric 'accuracy' needs a format of kind multiple_choice, got 'text'" in err.value.problems[1]
    assert "config file not found" in err.value.problems[2]


# -- preparing and scoring -----------------------------------------------------------------


def test_multiple_choice_task_on_a_local_dataset_shaped_like_pubmedqa(tmp_path, tiny_chat_tokenizer):
    import datasets

    rows = [
        {"question": f"is {i} even?", "context": {"contexts": [f"about {i}", "more"]}, "final_decision": d}
        for i, d in enumerate(["yes", "no", "maybe", "yes", "no"])
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "pubmedqa")
    config = load_task_config(Path(__file__).parents[1] / "configs" / "tasks" / "pubmedqa.yaml")
    config = config.model_copy(update={"source": config.source.model_copy(update={"name": str(tmp_path / "pubmedqa")})})
    task = configured_task(config, context(tiny_chat_tokenizer, max_samples=4))
    score = task.score(make_tiny_model("llama-gqa"))
    assert task.metric == "accuracy" and score.samples == 4
    assert 0 <= score.values["accuracy"] <= 1 and set(score.values) == {"accuracy", "accuracy_norm"}


def test_perplexity_task_scores_responses_only(tmp_path, tiny_chat_tokenizer):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)]
    config = TaskConfig(
        name="qa",
        source=write_jsonl(tmp_path / "qa.jsonl", rows),
        format={"kind": "instruction", "prompt": "{q}", "response": "{a}"},
        metric="perplexity",
    )
    score = configured_task(config, context(tiny_chat_tokenizer)).score(make_tiny_model("llama-gqa"))
    # Targets: "answer N<eos>" is 9 tokens, each predicted once.
    assert score.samples == 5 and score.values["tokens"] == 5 * 9


def test_rouge_task_generates_within_the_limit(tmp_path, tiny_chat_tokenizer, caplog):
    rows = [{"q": "summarize " + "words " * 30, "a": "short"} for _ in range(2)]
    config = TaskConfig(
        name="summaries",
        source=write_jsonl(tmp_path / "s.jsonl", rows),
        format={"kind": "instruction", "prompt": "{q}", "response": "{a}"},
        metric="rouge",
        max_length=64,
        max_new_tokens=8,
    )
    with caplog.at_level(logging.WARNING):
        task = configured_task(config, context(tiny_chat_tokenizer))
    assert "summaries: 2 of 2 sequences are longer than 56 tokens" in caplog.text
    score = task.score(make_tiny_model("llama-gqa"))
    assert score.samples == 2 and set(score.values) == {"rouge1", "rouge2", "rougeL"}


def test_sample_caps_take_the_smaller(tmp_path, tiny_tokenizer):
    model = make_tiny_model("llama-gqa")
    config = TaskConfig(name="t", source=write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}] * 9), metric="perplexity")
    assert configured_task(config, context(tiny_tokenizer, max_samples=4)).score(model).samples == 4
    config = config.model_copy(update={"max_samples": 2})
    assert configured_task(config, context(tiny_tokenizer, max_samples=4)).score(model).samples == 2


def test_domain_perplexity_scores_the_held_out_split(tmp_path, tiny_tokenizer):
    data = DataConfig(source=write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(200)]), seq_len=16)
    model = make_tiny_model("llama-gqa")
    score = domain_perplexity(context(tiny_tokenizer, data=data)).score(model)
    held_out = encode_table(load_splits(data, seed=0).evaluation, data, tiny_tokenizer)
    assert score.values == perplexity(model, held_out).values and score.samples == len(held_out)


def test_task_with_missing_columns_fails_while_preparing(tmp_path, tiny_tokenizer):
    config = TaskConfig(name="t", source=write_jsonl(tmp_path / "t.jsonl", [{"body": "abc"}]), metric="perplexity")
    with pytest.raises(DataError, match=r"missing column\(s\) text"):
        configured_task(config, context(tiny_tokenizer))
