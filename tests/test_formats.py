"""Task formats: templates, chat prompts, label masking of prompts, answers, truncation."""

from __future__ import annotations

import logging

import pytest

from atp_ray.config import InstructionFormat, MultipleChoiceFormat, TextFormat
from atp_ray.data.formats import (
    Pair,
    PromptEncoder,
    check_columns,
    choice_questions,
    fit_pair,
    fit_pairs,
    generation_prompts,
    render,
    required_columns,
    resolve_answer,
    training_pairs,
)
from atp_ray.data.sources import Table
from atp_ray.errors import DataError

INSTRUCTION = InstructionFormat(prompt="q: {question}", response="{answer}", system="be brief")
CHOICE = MultipleChoiceFormat(question="{question}", choices=["yes", "no", "{other}"], answer="label")


def table(*rows):
    return Table(list(rows), list(rows[0]), "test rows")


def decode(tokenizer, ids):
    return tokenizer.decode(ids)


def test_render_fills_nested_fields_and_joins_lists():
    row = {"title": "t", "context": {"parts": ["a", "b"]}, "n": None}
    assert render("{title}: {context.parts}|{context.parts.1}|{n}", row) == "t: a\nb|b|"


def test_required_columns_cover_templates_and_named_columns():
    assert required_columns(TextFormat(text="{title}\n{body.text}")) == {"title", "body"}
    assert required_columns(CHOICE) == {"question", "other", "label"}
    fmt = MultipleChoiceFormat(question="{q}", choices_column="options", answer="gold")
    assert required_columns(fmt) == {"q", "options", "gold"}


def test_missing_columns_are_named():
    with pytest.raises(DataError, match=r"missing column\(s\) answer, question .* it has text"):
        check_columns(table({"text": "x"}), INSTRUCTION)


def test_missing_nested_field_names_the_row(tiny_tokenizer):
    fmt = TextFormat(text="{meta.title}")
    with pytest.raises(DataError, match="test rows row 1: .*needs field 'title'"):
        training_pairs(table({"meta": {"title": "a"}}, {"meta": {}}), fmt, tiny_tokenizer)


def test_text_is_all_target_and_ends_with_eos(tiny_tokenizer):
    (pair,) = training_pairs(table({"text": "abc"}), TextFormat(), tiny_tokenizer)
    assert pair.prompt == []
    assert decode(tiny_tokenizer, pair.continuation) == "abc<eos>"


def test_instruction_in_chat_template_masks_the_prompt(tiny_chat_tokenizer):
    (pair,) = training_pairs(table({"question": "why", "answer": "because"}), INSTRUCTION, tiny_chat_tokenizer)
    assert decode(tiny_chat_tokenizer, pair.prompt) == "system: be brief<eos>user: q: why<eos>assistant: "
    assert decode(tiny_chat_tokenizer, pair.continuation) == "because<eos>"


def test_instruction_without_chat_template(tiny_tokenizer):
    (pair,) = training_pairs(table({"question": "why", "answer": "because"}), INSTRUCTION, tiny_tokenizer)
    assert decode(tiny_tokenizer, pair.prompt) == "be brief\n\nq: why\n"
    assert decode(tiny_tokenizer, pair.continuation) == "because<eos>"


def test_chat_template_can_be_turned_off(tiny_chat_tokenizer):
    encoder = PromptEncoder(tiny_chat_tokenizer, chat_template=False)
    assert encoder.prompt("hi") == "hi\n" and encoder.turn_end == "<eos>"


def test_multiple_choice_trains_on_the_right_choice(tiny_chat_tokenizer):
    rows = table({"question": "is it", "other": "maybe", "label": "maybe"})
    (pair,) = training_pairs(rows, CHOICE, tiny_chat_tokenizer)
    assert decode(tiny_chat_tokenizer, pair.continuation) == "maybe<eos>"


def test_choice_questions_score_unterminated_choices(tiny_chat_tokenizer):
    rows = table({"question": "is it", "other": "maybe", "label": 1})
    (question,) = choice_questions(rows, CHOICE, tiny_chat_tokenizer)
    assert question.answer == 1
    assert [decode(tiny_chat_tokenizer, p.continuation) for p in question.choices] == ["yes", "no", "maybe"]
    assert decode(tiny_chat_tokenizer, question.choices[0].prompt) == "user: is it<eos>assistant: "


def test_choices_from_a_list_column(tiny_tokenizer):
    fmt = MultipleChoiceFormat(question="{q}", choices_column="options", answer="gold")
    (question,) = choice_questions(table({"q": "pick", "options": ["a", "b", "c"], "gold": "C"}), fmt, tiny_tokenizer)
    assert question.answer == 2
    with pytest.raises(DataError, match="must hold a list of at least two choices"):
        choice_questions(table({"q": "pick", "options": "a", "gold": 0}), fmt, tiny_tokenizer)


@pytest.mark.parametrize(("value", "expected"), [(2, 2), ("2", 2), ("c", 2), ("C", 2), ("no", 1), (" yes ", 0)])
def test_answer_by_index_letter_or_text(value, expected):
    assert resolve_answer(value, ["yes", "no", "maybe"], "row") == expected


@pytest.mark.parametrize("value", [3, -1, "perhaps", True, None, "ab"])
def test_bad_answer_is_a_data_error(value):
    with pytest.raises(DataError, match="is not an index, letter or text of one of 3 choices"):
        resolve_answer(value, ["yes", "no", "maybe"], "row")


def test_generation_prompts_keep_the_reference_text(tiny_chat_tokenizer):
    (prompt,) = generation_prompts(table({"question": "why", "answer": "because"}), INSTRUCTION, tiny_chat_tokenizer)
    assert prompt.reference == "because"
    assert decode(tiny_chat_tokenizer, prompt.prompt).endswith("assistant: ")


def test_fit_pair_keeps_prompt_end_and_continuation_start():
    assert fit_pair(Pair([1, 2], [3]), 5) == Pair([1, 2], [3])
    assert fit_pair(Pair([], list(range(10))), 4) == Pair([], [0, 1, 2, 3])
    assert fit_pair(Pair(list(range(10)), [20, 21]), 5) == Pair([7, 8, 9], [20, 21])
    # Both too long: the continuation keeps half the budget.
    assert fit_pair(Pair(list(range(10)), list(range(20, 30))), 6) == Pair([7, 8, 9], [20, 21, 22])
    # A short prompt leaves the rest of the budget to the continuation.
    assert fit_pair(Pair([1], list(range(20, 30))), 6) == Pair([1], [20, 21, 22, 23, 24])


def test_fit_pairs_warns_once_with_a_count(caplog):
    with caplog.at_level(logging.WARNING):
        fitted = fit_pairs([Pair([], [1] * 9), Pair([], [1] * 3), Pair([2] * 8, [1])], 4, "my task")
    assert [len(p.prompt) + len(p.continuation) for p in fitted] == [4, 3, 4]
    assert "my task: 2 of 3 sequences are longer than 4 tokens and were truncated" in caplog.text


@pytest.mark.slow
def test_embedded_chat_template_masks_the_prompt():
    from atp_ray.runtime.modeling import load_tokenizer

    tokenizer = load_tokenizer("embedded:smollm2-135m-instruct")
    (pair,) = training_pairs(table({"question": "why", "answer": "because"}), INSTRUCTION, tokenizer)
    assert decode(tokenizer, pair.prompt).endswith("<|im_start|>user\nq: why<|im_end|>\n<|im_start|>assistant\n")
    assert decode(tokenizer, pair.continuation) == "because<|im_end|>\n"
