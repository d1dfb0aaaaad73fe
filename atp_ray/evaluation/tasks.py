"""Evaluation tasks: named built-ins or task YAMLs, prepared from data before any model runs.

A task spec is a built-in name (see BUILTIN_TASKS) or the path of a task YAML
(:class:`atp_ray.config.TaskConfig`, e.g. configs/tasks/pubmedqa.yaml). Preparing a task
reads and tokenizes its rows, fitted to the length limit, and returns a
:class:`PreparedTask` whose ``score(model)`` runs its metric. Preparing every task before
scoring any means a bad dataset fails before model time is spent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from atp_ray.compression.speed import decode_seconds, median_seconds, prefill_seconds, random_tokens
from atp_ray.config import DataConfig, MultipleChoiceFormat, TaskConfig, load_task_config
from atp_ray.data.batches import encode_table, load_splits, pad
from atp_ray.data.formats import (
    GenerationPrompt,
    Pair,
    choice_questions,
    fit_pairs,
    fit_questions,
    generation_prompts,
    training_pairs,
)
from atp_ray.data.sources import Table, load_table
from atp_ray.errors import ConfigError
from atp_ray.evaluation.evaluate import Score, generation_rouge, multiple_choice_accuracy, perplexity


@dataclass
class TaskContext:
    """What preparing a task may depend on: the tokenizer, limits, and the domain data under test."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int  # the model's own limit (max_position_embeddings)
    max_samples: int | None  # a cap over every task (None = each task's own)
    batch_size: int
    data: DataConfig  # domain data whose held-out split "domain-ppl" scores
    seed: int  # the seed that split the domain data


Scorer = Callable[[nn.Module], Score]


@dataclass
class PreparedTask:
    """A task ready to score: ``score(model)`` runs its metric on its prepared inputs."""

    name: str
    metric: str
    score: Scorer


TaskBuilder = Callable[[TaskContext], PreparedTask]


def _cap(*limits: int | None) -> int | None:
    given = [n for n in limits if n is not None]
    return min(given) if given else None


# -- held-out domain perplexity ------------------------------------------------------------


def domain_perplexity(ctx: TaskContext) -> PreparedTask:
    """Perplexity on the evaluation split of the domain data: rows a run with this data and seed never trained on."""
    held_out = load_splits(ctx.data, ctx.seed).evaluation
    blocks = encode_table(held_out, ctx.data, ctx.tokenizer).head(ctx.max_samples)
    return PreparedTask("domain-ppl", "perplexity", partial(perplexity, blocks=blocks, batch_size=ctx.batch_size))


# -- speed -------------------------------------------------------------------------------------

# Prompt and generation lengths of the latency task: a typical short-prompt serving request.
LATENCY_PROMPT_TOKENS = 256
LATENCY_NEW_TOKENS = 32
LATENCY_REPEATS = 3


def _latency_score(model: nn.Module) -> Score:
    ids = random_tokens(model, 1, LATENCY_PROMPT_TOKENS)
    prefill = median_seconds(lambda: prefill_seconds(model, ids), LATENCY_REPEATS)
    decode = median_seconds(lambda: decode_seconds(model, ids, LATENCY_NEW_TOKENS), LATENCY_REPEATS)
    return Score(
        {"prefill_ms": 1000 * prefill, "decode_tokens_per_s": LATENCY_NEW_TOKENS / decode},
        samples=LATENCY_REPEATS,
    )


def latency(ctx: TaskContext) -> PreparedTask:
    """Batch-1 latency: prefill of a 256-token prompt (ms) and greedy decode speed (tokens/s), medians of 3.

    Wall-clock numbers of the model as loaded: a masked run still computes its cut units,
    so only a compressed folder shows the speed a pruned model really has.
    """
    del ctx  # random prompts: nothing to prepare
    return PreparedTask("latency", "latency", _latency_score)


# -- tasks from a TaskConfig, by metric -----------------------------------------------------


def _perplexity_inputs(config: TaskConfig, table: Table, ctx: TaskContext, max_len: int) -> Scorer:
    pairs = fit_pairs(training_pairs(table, config.format, ctx.tokenizer), max_len, config.name)
    blocks = pad(pairs, max(len(p.prompt) + len(p.continuation) for p in pairs), ctx.tokenizer.pad_token_id)
    return partial(perplexity, blocks=blocks, batch_size=ctx.batch_size)


def _accuracy_inputs(config: TaskConfig, table: Table, ctx: TaskContext, max_len: int) -> Scorer:
    questions = fit_questions(choice_questions(table, config.format, ctx.tokenizer), max_len, config.name)
    return partial(multiple_choice_accuracy, questions=questions, pad_id=ctx.tokenizer.pad_token_id)


def _rouge_inputs(config: TaskConfig, table: Table, ctx: TaskContext, max_len: int) -> Scorer:
    # The prompt gives up its start so that generation still fits within max_len.
    budget = max(1, max_len - config.max_new_tokens)
    prompts = generation_prompts(table, config.format, ctx.tokenizer)
    fitted = fit_pairs([Pair(p.prompt, []) for p in prompts], budget, config.name)
    prompts = [GenerationPrompt(f.prompt, p.reference) for f, p in zip(fitted, prompts, strict=True)]
    return partial(generation_rouge, tokenizer=ctx.tokenizer, prompts=prompts, max_new_tokens=config.max_new_tokens)


METRIC_INPUTS: dict[str, Callable[[TaskConfig, Table, TaskContext, int], Scorer]] = {
    "perplexity": _perplexity_inputs,
    "accuracy": _accuracy_inputs,
    "rouge": _rouge_inputs,
}


def configured_task(config: TaskConfig, ctx: TaskContext) -> PreparedTask:
    """A task from its config: its first rows (capped), read by its format, scored by its metric."""
    table = load_table(config.source, _cap(config.max_samples, ctx.max_samples))
    max_len = min(config.max_length, ctx.max_length)
    return PreparedTask(config.name, config.metric, METRIC_INPUTS[config.metric](config, table, ctx, max_len))


# -- built-in tasks and resolving specs -------------------------------------------------------

HPO_TERM = TaskConfig(
    name="hpo-term",
    source="builtin:hpo-term-quiz",
    format=MultipleChoiceFormat(
        question="Which Human Phenotype Ontology term has this definition?\n{definition}",
        choices_column="choices",
        answer="answer",
    ),
    metric="accuracy",
)
ICD10_CHAPTER = TaskConfig(
    name="icd10-chapter",
    source="builtin:icd10cm-chapter-quiz",
    format=MultipleChoiceFormat(
        question="Which chapter of ICD-10-CM holds this diagnosis?\n{description}",
        choices_column="choices",
        answer="answer",
    ),
    metric="accuracy",
)

BUILTIN_TASKS: dict[str, TaskBuilder] = {
    "domain-ppl": domain_perplexity,
    "hpo-term": partial(configured_task, HPO_TERM),
    "icd10-chapter": partial(configured_task, ICD10_CHAPTER),
    "latency": latency,
}
DEFAULT_TASKS = ("domain-ppl", "hpo-term", "icd10-chapter", "latency")


def resolve_tasks(specs: list[str]) -> list[TaskBuilder]:
    """Builders for built-in names and task YAML paths; one ConfigError lists every bad spec."""
    builders, problems = [], []
    for spec in specs:
        if spec in BUILTIN_TASKS:
            builders.append(BUILTIN_TASKS[spec])
        elif Path(spec).suffix in (".yaml", ".yml"):
            try:
                builders.append(partial(configured_task, load_task_config(spec)))
            except ConfigError as err:
                problems += err.problems
        else:
            problems.append(
                f"--tasks: unknown task {spec!r}; built-in: {', '.join(BUILTIN_TASKS)}, or the path of a task YAML"
            )
    if problems:
        raise ConfigError(problems)
    return builders
