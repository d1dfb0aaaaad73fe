"""Data configs, disjoint seeded splits, packing and padding with attention and label masks."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from atp_ray.config import BuiltinSource, DataConfig, FileSource, HubSource, load_config
from atp_ray.data.batches import IGNORE_INDEX, BatchStream, build_splits, load_splits, pack, pad, split_table
from atp_ray.data.formats import Pair
from atp_ray.data.sources import Table
from atp_ray.errors import ConfigError, DataError

MODEL = {"path": "embedded:smollm2-135m-instruct"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def numbered_docs(n):
    # Every document holds its own number, so a decoded block tells which documents it came from.
    return [{"text": f"doc {i:03d} " + "x" * (i % 5), "id": i} for i in range(n)]


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shorthand", "expected"),
    [
        ("builtin:hpo", BuiltinSource(name="hpo")),
        ("hub:qiaojin/PubMedQA", HubSource(name="qiaojin/PubMedQA")),
        ("file:data/notes.txt", FileSource(path="data/notes.txt")),
        ("data/notes.parquet", FileSource(path="data/notes.parquet")),
    ],
)
def test_source_shorthands(shorthand, expected):
    assert DataConfig(source=shorthand).source == expected


def test_source_mapping_with_subset_and_split():
    config = load_config(
        {"model": MODEL, "data": {"source": {"kind": "hub", "name": "org/ds", "subset": "s", "split": "test"}}}
    )
    assert config.data.source == HubSource(name="org/ds", subset="s", split="test")


def test_data_config_reports_every_problem_at_once():
    data = {
        "source": "nowhere",
        "format": {"kind": "multiple_choice", "question": "{q}", "answer": "a"},
        "seq_len": 0,
    }
    with pytest.raises(ConfigError) as err:
        load_config({"model": MODEL, "data": data})
    text = str(err.value)
    assert "3 problem(s)" in text
    assert "data.source: value error, expected 'builtin:name'" in text
    assert "give exactly one of choices" in text
    assert "data.seq_len" in text


def test_override_switches_the_corpus():
    config = load_config({"model": MODEL}, ["data.source=builtin:icd10cm"])
    assert config.data.source == BuiltinSource(name="icd10cm")


# -- splits --------------------------------------------------------------------------------


def split_ids(splits):
    return {name: {r["id"] for r in getattr(splits, name).rows} for name in ("train", "calibration", "evaluation")}


def test_splits_are_disjoint_cover_everything_and_follow_the_seed():
    table = Table(numbered_docs(200), ["text", "id"], "docs")
    ids = split_ids(split_table(table, 0.1, 0.05, seed=7))
    assert (len(ids["train"]), len(ids["calibration"]), len(ids["evaluation"])) == (170, 20, 10)
    assert not ids["train"] & ids["calibration"] and not ids["train"] & ids["evaluation"]
    assert not ids["calibration"] & ids["evaluation"]
    assert ids["train"] | ids["calibration"] | ids["evaluation"] == set(range(200))
    assert split_ids(split_table(table, 0.1, 0.05, seed=7)) == ids
    assert split_ids(split_table(table, 0.1, 0.05, seed=8))["evaluation"] != ids["evaluation"]


def test_duplicate_rows_cannot_straddle_splits(tmp_path):
    rows = numbered_docs(50) + numbered_docs(50)
    splits = load_splits(DataConfig(source=write_jsonl(tmp_path / "d.jsonl", rows)), seed=0)
    assert sum(len(getattr(splits, n).rows) for n in ("train", "calibration", "evaluation")) == 50


def test_too_few_rows_is_a_data_error():
    with pytest.raises(DataError, match="2 rows are too few"):
        split_table(Table(numbered_docs(2), ["text", "id"], "docs"), 0.1, 0.1, seed=0)


def test_packed_splits_share_no_document(tmp_path, tiny_tokenizer):
    config = DataConfig(source=write_jsonl(tmp_path / "d.jsonl", numbered_docs(300)), seq_len=32)
    splits = build_splits(config, tiny_tokenizer, seed=1)
    seen = {}
    for name in ("train", "calibration", "evaluation"):
        text = tiny_tokenizer.decode(getattr(splits, name).input_ids.flatten())
        seen[name] = {w for w in text.split() if w.isdigit()}
    assert seen["evaluation"] and seen["calibration"]
    assert not seen["train"] & seen["evaluation"] and not seen["calibration"] & seen["evaluation"]
    assert not seen["train"] & seen["calibration"]


def test_missing_column_fails_before_tokenizing(tmp_path, tiny_tokenizer):
    config = DataConfig(source=write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}] * 20))
    with pytest.raises(DataError, match=r"missing column\(s\) text .* it has body"):
        build_splits(config, tiny_tokenizer, seed=0)


# -- layouts -------------------------------------------------------------------------------


def test_pack_makes_full_blocks_of_targets():
    blocks = pack([Pair([], [1, 2, 3]), Pair([], [4, 5, 6, 7]), Pair([], [8])], seq_len=3, pad_id=0)
    assert blocks.input_ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert blocks.attention_mask.eq(1).all() and torch.equal(blocks.labels, blocks.input_ids)


def test_pack_masks_prompts_and_drops_blocks_without_targets():
    blocks = pack([Pair([9, 9, 9], [1]), Pair([8, 8, 8, 8], [2, 3])], seq_len=3, pad_id=0)
    # Tokens 9 8 8 | 8 8 2 | ... : the first block, [9, 9, 9], is all prompt and goes.
    assert blocks.input_ids.tolist() == [[1, 8, 8], [8, 8, 2]]
    assert blocks.labels.tolist() == [[1, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 2]]


def test_pad_masks_padding_and_prompt():
    blocks = pad([Pair([5, 6], [7]), Pair([], [1, 2, 3, 4])], seq_len=4, pad_id=0)
    assert blocks.input_ids.tolist() == [[5, 6, 7, 0], [1, 2, 3, 4]]
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert blocks.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX], [1, 2, 3, 4]]


def test_instruction_data_pads_with_the_prompt_masked(tmp_path, tiny_chat_tokenizer):
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(40)]
    config = DataConfig(
        source=write_jsonl(tmp_path / "qa.jsonl", rows),
        format={"kind": "instruction", "prompt": "{q}", "response": "{a}"},
        seq_len=48,
    )
    blocks = build_splits(config, tiny_chat_tokenizer, seed=0).train
    targets = blocks.labels[0][blocks.labels[0] != IGNORE_INDEX]
    attended = blocks.input_ids[0][blocks.attention_mask[0] == 1]
    target_text = tiny_chat_tokenizer.decode(targets)
    assert target_text.startswith("answer ") and target_text.endswith("<eos>")
    assert tiny_chat_tokenizer.decode(attended).startswith("user: question ")
    assert (blocks.labels[blocks.attention_mask == 0] == IGNORE_INDEX).all()


def test_text_longer_than_a_block_is_truncated_with_a_warning(tmp_path, tiny_tokenizer, caplog):
    rows = [{"text": f"{i} " + "word " * (40 if i == 3 else 2)} for i in range(30)]
    config = DataConfig(source=write_jsonl(tmp_path / "d.jsonl", rows), layout="pad", seq_len=16)
    with caplog.at_level(logging.WARNING):
        splits = build_splits(config, tiny_tokenizer, seed=0)
    assert " split): 1 of" in caplog.text and "longer than 16 tokens and were truncated" in caplog.text
    assert splits.train.input_ids.shape[1] == 16


def test_seq_len_above_the_model_limit_is_capped_with_a_warning(tmp_path, tiny_tokenizer, caplog):
    tiny_tokenizer.model_max_length = 8
    config = DataConfig(source=write_jsonl(tmp_path / "d.jsonl", numbered_docs(60)), seq_len=32)
    with caplog.at_level(logging.WARNING):
        blocks = build_splits(config, tiny_tokenizer, seed=0).train
    assert blocks.input_ids.shape[1] == 8 and "exceeds the model's maximum length 8" in caplog.text


# -- batches -------------------------------------------------------------------------------


def test_batch_stream_is_a_pure_function_of_the_step_and_ranks_are_disjoint():
    blocks = pad([Pair([], [i]) for i in range(12)], seq_len=1, pad_id=0)
    stream = BatchStream(blocks, batch_size=2, seed=3)
    assert torch.equal(stream.batch(5)["input_ids"], BatchStream(blocks, 2, 3).batch(5)["input_ids"])
    ranks = [BatchStream(blocks, 2, 3, rank=r, world_size=3).batch(0)["input_ids"].flatten().tolist() for r in range(3)]
    assert len({i for r in ranks for i in r}) == 6
