"""Task formats: how a row becomes token ids, with prompts kept apart from targets.

Every format reduces a row to a :class:`Pair`: prompt tokens (context, never a target) and
continuation tokens (the target). Plain text has an empty prompt; an instruction row's
prompt is the user turn in the model's chat template (when it has one) and its
continuation the response plus the template's end-of-turn; a multiple-choice row gives
one continuation per choice. Row templates name columns as ``{column}`` or
``{column.key}`` (nested fields); list values are joined with newlines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from atp_ray.config import TEMPLATE_FIELD, Format, InstructionFormat, MultipleChoiceFormat, TextFormat, template_fields
from atp_ray.data.corpora import Row
from atp_ray.data.sources import Table
from atp_ray.errors import DataError

log = logging.getLogger(__name__)

# Format attributes that hold row templates, and those that name a column directly.
TEMPLATE_ATTRS = ("text", "prompt", "response", "system", "question", "choices")
COLUMN_ATTRS = ("choices_column", "answer")


@dataclass(frozen=True)
class Pair:
    """Prompt ids (context only) followed by continuation ids (the targets)."""

    prompt: list[int]
    continuation: list[int]


@dataclass(frozen=True)
class ChoiceQuestion:
    """A multiple-choice question as tokens: one (context, choice) pair per choice, ``answer`` the right index."""

    choices: list[Pair]
    answer: int


@dataclass(frozen=True)
class GenerationPrompt:
    """Prompt ids to generate from, and the reference text the generation is scored against."""

    prompt: list[int]
    reference: str


# -- templates and columns ----------------------------------------------------------------


def required_columns(fmt: Format) -> set[str]:
    """Top-level columns a format reads."""
    templates: list[str] = []
    for attr in TEMPLATE_ATTRS:
        value = getattr(fmt, attr, None)
        templates += value if isinstance(value, list) else [value] if value else []
    columns = {field.split(".")[0] for t in templates for field in template_fields(t)}
    return columns | {getattr(fmt, a) for a in COLUMN_ATTRS if getattr(fmt, a, None)}


def check_columns(table: Table, fmt: Format) -> None:
    """DataError naming every column the format needs that the table lacks."""
    missing = sorted(required_columns(fmt) - set(table.columns))
    if missing:
        raise DataError(
            f"{table.origin}: missing column(s) {', '.join(missing)} needed by the {fmt.kind} format; "
            f"it has {', '.join(table.columns) or 'none'}"
        )


def _lookup(row: Row, path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict):
            value = value[part]
        elif isinstance(value, list) and part.isdigit():
            value = value[int(part)]
        else:
            raise KeyError(part)
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(_as_text(v) for v in value)
    return "" if value is None else str(value)


def render(template: str, row: Row) -> str:
    """A row template filled in; KeyError/IndexError if a field is missing from the row."""
    return TEMPLATE_FIELD.sub(lambda m: _as_text(_lookup(row, m.group(1))), template)


def _render_checked(template: str, row: Row, where: str) -> str:
    try:
        return render(template, row)
    except (KeyError, IndexError) as err:
        raise DataError(f"{where}: template {template!r} needs field {err} that the row lacks") from None


# -- prompts in and out of chat templates --------------------------------------------------


class PromptEncoder:
    """Text of a user turn and of the answer that follows it.

    With a chat template the prompt ends with the assistant header (generation prompt) and
    an answer ends with the template's own end-of-turn text; without one, the prompt is the
    text and a newline and an answer ends with the EOS token.
    """

    _PROBE = "\x00atp-ray-answer\x00"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool):
        self.tokenizer = tokenizer
        self.chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.turn_end = self._chat_turn_end() if self.chat else tokenizer.eos_token

    @staticmethod
    def _messages(user: str, system: str | None) -> list[dict[str, str]]:
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def _chat_turn_end(self) -> str:
        # What the template writes after an assistant message, found by rendering a probe answer.
        messages = self._messages("?", None)
        prompt = self.prompt("?", None)
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": self._PROBE}], tokenize=False
        )
        # Some templates render a finished assistant turn unlike the generation prompt (reasoning
        # tags, trimmed whitespace); the suffix is then unknown and EOS closes the answer.
        if not full.startswith(prompt) or self._PROBE not in full:
            return self.tokenizer.eos_token
        return full.split(self._PROBE, 1)[1]

    def prompt(self, user: str, system: str | None = None) -> str:
        """The prompt text that precedes an answer."""
        if not self.chat:
            return f"{system}\n\n{user}\n" if system else f"{user}\n"
        messages = self._messages(user, system)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answer(self, text: str, end_turn: bool) -> str:
        """An answer's text; ``end_turn`` closes the turn (for training, not for scoring choices)."""
        return text + self.turn_end if end_turn else text


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, prompts: list[str], continuations: list[str]) -> list[Pair]:
    """Batch-tokenize prompt and continuation texts separately, so their boundary is exact."""
    # Special tokens are spelled out in the texts (chat templates, EOS), so none are added here.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(continuations, add_special_tokens=False)["input_ids"]
    return [Pair(p, c) for p, c in zip(prompt_ids, cont_ids, strict=True)]


# -- rows -> training pairs, per format ---------------------------------------------------


def resolve_answer(value: Any, choices: list[str], where: str) -> int:
    """The index of the right choice from an index, a digit string, a letter A-Z or the choice's text."""
    if isinstance(value, str):
        text = value.strip()
        if text in choices:
            return choices.index(text)
        if text.isdigit():
            value = int(text)
        elif len(text) == 1 and "A" <= text.upper() <= "Z":
            value = ord(text.upper()) - ord("A")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return value
    raise DataError(f"{where}: answer {value!r} is not an index, letter or text of one of {len(choices)} choices")


def render_choices(fmt: MultipleChoiceFormat, row: Row, where: str) -> list[str]:
    """The choice texts of a row: its templates filled in, or its list column."""
    if fmt.choices is not None:
        return [_render_checked(t, row, where) for t in fmt.choices]
    value = row[fmt.choices_column]
    if not isinstance(value, list) or len(value) < 2:
        column = fmt.choices_column
        raise DataError(f"{where}: column {column!r} must hold a list of at least two choices, got {value!r}")
    return [_as_text(v) for v in value]


PairTexts = Callable[[Any, Row, PromptEncoder, str], tuple[str, str]]


def _text_pair(fmt: TextFormat, row: Row, encoder: PromptEncoder, where: str) -> tuple[str, str]:
    # Plain text: no prompt; EOS closes each document so packed documents stay apart.
    return "", _render_checked(fmt.text, row, where) + encoder.tokenizer.eos_token


def _instruction_pair(fmt: InstructionFormat, row: Row, encoder: PromptEncoder, where: str) -> tuple[str, str]:
    system = _render_checked(fmt.system, row, where) if fmt.system else None
    prompt = encoder.prompt(_render_checked(fmt.prompt, row, where), system)
    return prompt, encoder.answer(_render_checked(fmt.response, row, where), end_turn=True)


def _choice_pair(fmt: MultipleChoiceFormat, row: Row, encoder: PromptEncoder, where: str) -> tuple[str, str]:
    # Trained like an instruction: the question is the prompt, the right choice the response.
    choices = render_choices(fmt, row, where)
    right = choices[resolve_answer(row[fmt.answer], choices, where)]
    return encoder.prompt(_render_checked(fmt.question, row, where)), encoder.answer(right, end_turn=True)


PAIR_TEXTS: dict[str, PairTexts] = {
    "text": _text_pair,
    "instruction": _instruction_pair,
    "multiple_choice": _choice_pair,
}


def training_pairs(table: Table, fmt: Format, tokenizer: PreTrainedTokenizerBase) -> list[Pair]:
    """One prompt/target pair per row, in any format."""
    check_columns(table, fmt)
    encoder = PromptEncoder(tokenizer, getattr(fmt, "chat_template", False))
    texts = [PAIR_TEXTS[fmt.kind](fmt, row, encoder, f"{table.origin} row {i}") for i, row in enumerate(table.rows)]
    return tokenize_pairs(tokenizer, [p for p, _ in texts], [c for _, c in texts])


# -- rows -> evaluation inputs ------------------------------------------------------------


def choice_questions(
    table: Table, fmt: MultipleChoiceFormat, tokenizer: PreTrainedTokenizerBase
) -> list[ChoiceQuestion]:
    """Each row as a context and one unterminated continuation per choice."""
    check_columns(table, fmt)
    encoder = PromptEncoder(tokenizer, fmt.chat_template)
    questions = []
    for i, row in enumerate(table.rows):
        where = f"{table.origin} row {i}"
        choices = render_choices(fmt, row, where)
        answer = resolve_answer(row[fmt.answer], choices, where)
        context = tokenizer(encoder.prompt(_render_checked(fmt.question, row, where)), add_special_tokens=False)
        continuations = tokenizer([encoder.answer(c, end_turn=False) for c in choices], add_special_tokens=False)
        questions.append(ChoiceQuestion([Pair(context["input_ids"], c) for c in continuations["input_ids"]], answer))
    return questions


def generation_prompts(
    table: Table, fmt: InstructionFormat, tokenizer: PreTrainedTokenizerBase
) -> list[GenerationPrompt]:
    """Each row's prompt as tokens, with its response as the reference text."""
    pairs = training_pairs(table, fmt, tokenizer)
    return [
        GenerationPrompt(pair.prompt, _render_checked(fmt.response, row, f"{table.origin} row {i}"))
        for i, (pair, row) in enumerate(zip(pairs, table.rows, strict=True))
    ]


# -- length limits ------------------------------------------------------------------------


def fit_pair(pair: Pair, max_len: int) -> Pair:
    """Cut a pair to ``max_len`` tokens, keeping what predicts the targets best.

    The continuation keeps its start, and at least half the budget when the prompt also
    needs room; the prompt keeps its end (the question and the assistant header, next to
    the continuation). Plain text has no prompt, so it simply keeps its first tokens.
    """
    prompt, cont = pair.prompt, pair.continuation
    if len(prompt) + len(cont) <= max_len:
        return pair
    keep_cont = min(len(cont), max(max_len - len(prompt), max_len // 2))
    keep_prompt = max_len - keep_cont
    return Pair(prompt[len(prompt) - keep_prompt :], cont[:keep_cont])


def _warn_too_long(pairs: list[Pair], max_len: int, what: str) -> None:
    too_long = sum(len(p.prompt) + len(p.continuation) > max_len for p in pairs)
    if too_long:
        log.warning(
            "%s: %d of %d sequences are longer than %d tokens and were truncated", what, too_long, len(pairs), max_len
        )


def fit_pairs(pairs: list[Pair], max_len: int, what: str) -> list[Pair]:
    """:func:`fit_pair` on every pair, with one warning that says how many were cut."""
    _warn_too_long(pairs, max_len, what)
    return [fit_pair(p, max_len) for p in pairs]


def fit_questions(questions: list[ChoiceQuestion], max_len: int, what: str) -> list[ChoiceQuestion]:
    """:func:`fit_pair` on every choice of every question, with one warning."""
    _warn_too_long([p for q in questions for p in q.choices], max_len, what)
    return [ChoiceQuestion([fit_pair(p, max_len) for p in q.choices], q.answer) for q in questions]
