"""Data sources: built-in corpora, local files, datasets folders (the hub code path), bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atp_ray.config import BuiltinSource, FileSource, HubSource
from atp_ray.data import corpora, quizzes
from atp_ray.data.sources import BUILTIN_SOURCES, load_table
from atp_ray.errors import DataError

ROWS = [{"text": f"document number {i}", "label": i} for i in range(6)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- built-in corpora ----------------------------------------------------------------------


def test_hpo_rows_are_term_and_definition():
    rows = corpora.hpo_rows()
    assert len(rows) > 10_000
    hypertension = next(r for r in rows if r["term"] == "Hypertension")
    assert hypertension["text"] == f"Hypertension: {hypertension['definition']}"
    assert "systemic arterial" in hypertension["definition"] and '"' not in hypertension["definition"]
    assert not any(r["term"].startswith("obsolete") for r in rows)


def test_icd10cm_rows_hold_diagnoses_notes_and_chapters():
    rows = {r["code"]: r for r in corpora.icd10cm_rows()}
    assert len(rows) > 40_000
    typhoid_heart = rows["A01.02"]
    assert typhoid_heart["description"] == "Typhoid fever with heart involvement"
    assert typhoid_heart["chapter"] == "Certain infectious and parasitic diseases"
    assert "Includes: Typhoid endocarditis; Typhoid myocarditis." in typhoid_heart["text"]


def test_licence_rows_have_front_matter_stripped():
    rows = {r["key"]: r for r in corpora.licence_rows()}
    mit = rows["mit"]
    assert mit["name"] == "MIT License"
    assert mit["text"].startswith("Permission is hereby granted")
    # Some licence bodies open with a line of dashes; no body may still hold its YAML header.
    assert not any(r["text"].lstrip("-\n ").startswith("key: ") for r in rows.values())


def test_split_front_matter_runs_to_the_second_fence():
    header, body = corpora.split_front_matter("---\nkey: x\nnotes: a\n---\n\nBody text\n--- not a fence\n")
    assert header == "key: x\nnotes: a"
    assert body == "\nBody text\n--- not a fence\n"
    assert corpora.split_front_matter("no header") == ("", "no header")


def test_quiz_is_seeded_with_distinct_choices_and_the_right_answer():
    rows = [{"q": f"question {i}", "a": f"answer {i % 7}"} for i in range(40)]
    quiz = quizzes.make_quiz(rows, "a", ("q",), seed=3)
    assert quiz == quizzes.make_quiz(rows, "a", ("q",), seed=3)
    assert quiz != quizzes.make_quiz(rows, "a", ("q",), seed=4)
    by_question = {r["q"]: r["a"] for r in rows}
    for item in quiz:
        assert len(set(item["choices"])) == quizzes.NUM_CHOICES
        assert item["choices"][item["answer"]] == by_question[item["q"]]


def test_builtin_quizzes_point_at_the_right_answer():
    terms = {r["definition"]: r["term"] for r in corpora.hpo_rows()}
    for item in quizzes.hpo_term_quiz()[:20]:
        assert item["choices"][item["answer"]] == terms[item["definition"]]
    chapters = {r["code"]: r["chapter"] for r in corpora.icd10cm_rows()}
    for item in quizzes.icd10cm_chapter_quiz()[:20]:
        assert item["choices"][item["answer"]] == chapters[item["code"]]


@pytest.mark.parametrize("name", sorted(BUILTIN_SOURCES))
def test_every_builtin_source_loads(name):
    table = load_table(BuiltinSource(name=name), limit=3)
    assert len(table.rows) == 3 and set(table.columns) == set(table.rows[0])


def test_unknown_builtin_is_a_data_error():
    with pytest.raises(DataError, match="unknown built-in corpus 'nope'.*hpo"):
        load_table(BuiltinSource(name="nope"))


# -- local files ---------------------------------------------------------------------------


def test_jsonl_csv_and_parquet_files(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        table = load_table(FileSource(path=str(tmp_path / name)))
        assert table.rows == ROWS and table.columns == ["text", "label"]
    assert len(load_table(FileSource(path=str(tmp_path / "d.jsonl")), limit=2).rows) == 2


def test_format_can_override_the_extension(tmp_path):
    path = write_jsonl(tmp_path / "data.txt", ROWS)
    assert load_table(FileSource(path=str(path), format="jsonl")).rows == ROWS
    with pytest.raises(DataError, match="unknown file format 'txt'"):
        load_table(FileSource(path=str(path)))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", "this is not json\n", "not a valid jsonl file"),
        ("bad.parquet", "plain text, not parquet\n", "not a valid parquet file"),
        ("bad.csv", b"\xff\xfe\x00binary", "not a valid csv file"),
        ("empty.jsonl", "", "the file is empty"),
        ("header_only.csv", "text,label\n", "the dataset is empty"),
    ],
)
def test_a_file_that_is_not_what_it_says_is_a_data_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        load_table(FileSource(path=str(path)))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_table(FileSource(path=str(tmp_path / "absent.jsonl")))


# -- datasets: the hub code path, on local folders -------------------------------------------


def test_dataset_dict_saved_to_disk_by_split(tmp_path):
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])})
    splits.save_to_disk(tmp_path / "ds")
    assert load_table(HubSource(name=str(tmp_path / "ds"), split="test")).rows == ROWS[:2]
    assert len(load_table(HubSource(name=str(tmp_path / "ds")), limit=4).rows) == 4
    with pytest.raises(DataError, match="no split 'validation'; it has train, test"):
        load_table(HubSource(name=str(tmp_path / "ds"), split="validation"))


def test_single_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "one")
    assert load_table(HubSource(name=str(tmp_path / "one"))).rows == ROWS


def test_folder_of_data_files_goes_through_load_dataset(tmp_path):
    write_jsonl((tmp_path / "raw").mkdir() or tmp_path / "raw" / "train.jsonl", ROWS)
    assert load_table(HubSource(name=str(tmp_path / "raw"), split="train")).rows == ROWS
    with pytest.raises(DataError, match="Unknown split"):
        load_table(HubSource(name=str(tmp_path / "raw"), split="test"))


def test_unreachable_hub_dataset_is_a_data_error(monkeypatch):
    import datasets

    # Offline mode makes the failure immediate; without it, the same error comes after retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub.*local dataset folder"):
        load_table(HubSource(name="no-such-org/no-such-dataset"))
