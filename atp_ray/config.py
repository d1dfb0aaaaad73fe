"""Validated run configs: YAML and ``dotted.key=value`` overrides in, typed objects out.

Every problem in a config is reported at once, each naming the field, the rule and the
value given, before any model is loaded. Sparsity always means the fraction of prunable
parameters removed (0 keeps everything); the engine works with the kept fraction
``1 - sparsity`` internally and names it so.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atp_ray.errors import ConfigError, UnsupportedArchitectureError
from atp_ray.models import DEFAULT_LORA_TARGETS, family_of
from atp_ray.models.embedded import EMBEDDED_MODEL
from atp_ray.pruning.importance import IMPORTANCE
from atp_ray.runtime.strategies import STRATEGIES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(
        description=f"hub id, local transformers folder, or {EMBEDDED_MODEL!r} (the offline default)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the frozen base weights are loaded in"
    )


class LoraSettings(_Section):
    rank: int = Field(8, gt=0, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description="projections that get LoRA in every decoder layer (default: every projection a unit owns)",
    )


# -- data: where rows come from, how a row becomes tokens -------------------------------

DATA_FILE_FORMATS = ("jsonl", "csv", "parquet")
TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_]\w*(?:\.\w+)*)\}")


def template_fields(template: str) -> list[str]:
    """The ``{column}`` / ``{column.key}`` references of a row template, in order."""
    return TEMPLATE_FIELD.findall(template)


class HubSource(_Section):
    """A ``datasets`` dataset: a Hugging Face Hub id, or a local folder ``datasets`` can read.

    These machines cannot reach the hub; point ``name`` at a local folder (one written by
    ``save_to_disk`` included) to use the same code path offline.
    """

    kind: Literal["hub"] = "hub"
    name: str = Field(min_length=1, description="hub dataset id (org/name) or a local dataset folder")
    subset: str | None = Field(None, description="dataset configuration name, e.g. 'pqa_labeled'")
    split: str = Field("train", min_length=1, description="split to read, e.g. 'train' or 'test'")
    revision: str | None = Field(None, description="git revision of a hub dataset (None = default branch)")


class FileSource(_Section):
    """A local data file with one row per line (jsonl), record (csv) or table row (parquet)."""

    kind: Literal["file"] = "file"
    path: str = Field(min_length=1, description="path to a .jsonl, .csv or .parquet file")
    format: Literal[DATA_FILE_FORMATS] | None = Field(None, description="file format (None = from the extension)")


class BuiltinSource(_Section):
    """An offline corpus read from an installed package (see ``atp_ray.data.sources.BUILTIN_SOURCES``)."""

    kind: Literal["builtin"] = "builtin"
    name: str = Field(min_length=1, description="built-in corpus, e.g. 'hpo', 'icd10cm', 'licences'")


Source = Annotated[HubSource | FileSource | BuiltinSource, Field(discriminator="kind")]

# Shorthand strings accepted for ``source``: "builtin:hpo", "hub:org/name", "file:path"
# (or a bare path ending in a data-file extension). Overrides like data.source=builtin:icd10cm
# stay one token.
_SHORTHAND_KEYS = {"builtin": "name", "hub": "name", "file": "path"}


def _expand_source(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind, sep, rest = value.partition(":")
    if sep and kind in _SHORTHAND_KEYS:
        return {"kind": kind, _SHORTHAND_KEYS[kind]: rest}
    if value.rsplit(".", 1)[-1].lower() in DATA_FILE_FORMATS:
        return {"kind": "file", "path": value}
    raise ValueError(
        f"expected 'builtin:NAME', 'hub:ORG/NAME', 'file:PATH', a path ending in "
        f"{', '.join('.' + f for f in DATA_FILE_FORMATS)}, or a mapping with a kind"
    )


def absolute_local_paths(raw: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """``raw`` with every relative path that names something under ``root`` made absolute.

    ``root`` defaults to the working directory. A search's trials run in Tune actors whose
    working directory is their trial folder, perhaps on another node, where a relative
    path names something else or nothing. Changes ``raw`` in place and returns it; hub ids
    (a model or dataset name that is not a local path) are left as they are.
    """
    root = Path.cwd() if root is None else root

    def absolute(value: Any) -> Any:
        if not isinstance(value, str) or Path(value).expanduser().is_absolute() or not (root / value).exists():
            return value
        return str((root / value).resolve())

    sections = {"model": ["path"], "baseline": ["mask_run"], "distributed": ["storage_path", "deepspeed_config"]}
    for section, keys in sections.items():
        values = raw.get(section)
        for key in keys if isinstance(values, dict) else []:
            if key in values:
                values[key] = absolute(values[key])
    data = raw.get("data")
    if isinstance(data, dict) and "source" in data:
        try:
            source = _expand_source(data["source"])
        except ValueError:
            return raw  # validation reports it
        key = _SHORTHAND_KEYS.get(source.get("kind")) if isinstance(source, dict) else None
        if key and key in source and source["kind"] != "builtin":
            data["source"] = {**source, key: absolute(source[key])}
    return raw


class _Templates(_Section):
    @model_validator(mode="after")
    def _balanced(self) -> _Templates:
        for name, value in self:
            for template in value if isinstance(value, list) else [value]:
                if isinstance(template, str) and template.count("{") != template.count("}"):
                    raise ValueError(f"{name}: unbalanced braces in template {template!r}")
        return self


class TextFormat(_Templates):
    """Plain text for causal LM: every token is a target."""

    kind: Literal["text"] = "text"
    text: str = Field("{text}", description="row template of the document, e.g. '{title}\\n{body}'")


class InstructionFormat(_Templates):
    """A prompt and its response; only the response is a target."""

    kind: Literal["instruction"] = "instruction"
    prompt: str = Field(description="row template of the user turn, e.g. '{question}'")
    response: str = Field(description="row template of the answer the model should give")
    system: str | None = Field(None, description="row template of a system turn (None = the template's default)")
    chat_template: bool = Field(True, description="wrap turns in the model's chat template when it has one")


class MultipleChoiceFormat(_Templates):
    """A question with choices; the answer names the right one (index, letter or its text)."""

    kind: Literal["multiple_choice"] = "multiple_choice"
    question: str = Field(description="row template of the question the choices continue")
    choices: list[str] | None = Field(
        None, min_length=2, description="row templates (or fixed words) of the choices, e.g. ['yes', 'no']"
    )
    choices_column: str | None = Field(None, description="column holding the list of choices (instead of choices)")
    answer: str = Field(description="column of the right choice: 0-based index, letter A-Z, or the choice's text")
    chat_template: bool = Field(True, description="wrap the question in the model's chat template when it has one")

    @model_validator(mode="after")
    def _one_choice_source(self) -> MultipleChoiceFormat:
        if (self.choices is None) == (self.choices_column is None):
            raise ValueError("give exactly one of choices (templates) and choices_column (a list column)")
        return self


Format = Annotated[TextFormat | InstructionFormat | MultipleChoiceFormat, Field(discriminator="kind")]


class DataConfig(_Section):
    """Domain data of a run: rows from ``source``, made into tokens by ``format``, then split."""

    source: Source = Field(
        default_factory=lambda: BuiltinSource(name="hpo"),
        description="hub / file / builtin mapping, or shorthand 'builtin:hpo', 'hub:org/name', 'file:x.jsonl'",
    )
    format: Format = Field(default_factory=TextFormat, description="how a row becomes a training example")
    layout: Literal["pack", "pad"] | None = Field(
        None, description="pack examples into full blocks, or pad one per block (None = pack text, pad the rest)"
    )
    seq_len: int = Field(128, gt=0, description="tokens per training block")
    max_documents: int | None = Field(None, gt=0, description="cap on rows read, first rows first (None = all)")
    calibration_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of rows for the generator")
    eval_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of rows held out for evaluation")

    _expand_source = field_validator("source", mode="before")(staticmethod(_expand_source))


# Which task formats each evaluation metric can score.
METRIC_FORMATS = {
    "perplexity": ("text", "instruction"),  # instruction: perplexity of the responses only
    "accuracy": ("multiple_choice",),
    "rouge": ("instruction",),  # greedy generation from the prompt against the response
}


class TaskConfig(_Section):
    """An evaluation task: rows from ``source``, read by ``format``, scored by ``metric``."""

    name: str = Field(min_length=1, description="name shown in reports")
    source: Source = Field(description="as in a run's data.source")
    format: Format = Field(default_factory=TextFormat, description="as in a run's data.format")
    metric: Literal[tuple(METRIC_FORMATS)] = Field(description="perplexity, accuracy (multiple choice) or rouge")
    max_samples: int | None = Field(None, gt=0, description="rows scored, first rows first (None = all)")
    max_length: int = Field(1024, gt=0, description="tokens per scored sequence; longer ones are cut, with a warning")
    max_new_tokens: int = Field(128, gt=0, description="length limit of greedy generation (rouge)")

    _expand_source = field_validator("source", mode="before")(staticmethod(_expand_source))

    @model_validator(mode="after")
    def _metric_fits_format(self) -> TaskConfig:
        allowed = METRIC_FORMATS[self.metric]
        if self.format.kind not in allowed:
            kinds = " or ".join(allowed)
            raise ValueError(f"metric {self.metric!r} needs a format of kind {kinds}, got {self.format.kind!r}")
        return self


def _budgets_from_range(value: dict[str, Any]) -> list[float]:
    """``{range: [lo, hi], points: n}``: n evenly spaced budgets, both ends included."""
    unknown = set(value) - {"range", "points"}
    if unknown or "range" not in value:
        raise ValueError(f"a sparsity range is {{range: [lo, hi], points: n}}, got {value!r}")
    bounds, points = value["range"], value.get("points", DEFAULT_RANGE_POINTS)
    if not (isinstance(bounds, list) and len(bounds) == 2 and isinstance(points, int) and points >= 2):
        raise ValueError(f"a sparsity range needs range: [lo, hi] and points >= 2, got {value!r}")
    low, high = (float(b) for b in bounds)
    return [low + (high - low) * i / (points - 1) for i in range(points)]


# Budgets of ``atp.sparsity: {range: [lo, hi]}`` when points is not given: 0.2..0.6 in steps of 0.1.
DEFAULT_RANGE_POINTS = 5


class ATPSettings(_Section):
    sparsity: float = Field(
        0.3,
        ge=0,
        le=0.95,
        description="target fraction of prunable parameters removed; a list or {range: [lo, hi], points: n} "
        "trains one elastic run for every budget (then this is the largest)",
    )
    sparsities: list[Annotated[float, Field(gt=0, le=0.95)]] | None = Field(
        None,
        description="the budgets of an elastic run, ascending (set by giving atp.sparsity a list or a range)",
    )
    budget_draw: Literal["sandwich", "cycle"] = Field(
        "sandwich",
        description="elastic runs: which budget each step trains: sandwich (smallest, largest, a random one, "
        "in turn) or cycle (every budget in turn)",
    )
    nested: bool = Field(
        True,
        description="elastic runs: a unit cut at one budget is cut at every larger one (one LoRA fits all sizes)",
    )
    ratio_weight: float = Field(5.0, gt=0, description="alpha: weight of the parameter-ratio loss")
    lasso_weight: float = Field(0.01, ge=0, description="lambda: weight of the LoRA group lasso")
    lasso_final_multiplier: float = Field(
        10.0, ge=1, description="lasso weight grows linearly to lambda x this over the final ramp"
    )
    lasso_ramp_fraction: float = Field(0.2, ge=0, le=1, description="final share of steps with the lasso ramp")
    control_fraction: float = Field(
        0.5, gt=0, le=1, description="share of steps that also train the generator (then the mask freezes)"
    )
    freeze_tolerance: float = Field(
        0.01, ge=0, description="freeze early once |achieved - target sparsity| stays within this"
    )
    freeze_patience: int = Field(20, gt=0, description="control steps the tolerance must hold to freeze early")
    freeze_loss_ratio: float | None = Field(
        1.15,
        ge=1,
        description="the mask freezes only if its loss on the first calibration batches is at most this x the "
        "generator's recent loss; else control goes on, up to control_extension_fraction (null = no check)",
    )
    control_extension_fraction: float = Field(
        0.3,
        ge=0,
        le=1,
        description="share of steps the control phase may run past its end while the noise-free mask "
        "is short of the target by more than freeze_tolerance (one past it freezes onto it)",
    )
    target_anneal_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of the control phase over which the generator's sparsity target rises linearly "
        "from 0 to the final one (0 = the final target from the first step)",
    )
    lagrangian_lr: float = Field(
        2.0,
        ge=0,
        description="ascent rate of the Lagrange multipliers on the budget, l1*(s-t) + l2*(s-t)^2, that "
        "grow until the sampled sparsity s meets the target t (0 = the fixed ratio weight alone)",
    )
    sparsity_control: Literal["lagrangian", "schedule"] = Field(
        "lagrangian",
        description="how the control masks meet the annealed target: lagrangian, pulled there by the ratio loss "
        "and the multipliers (the mask may lag, then catch up in bursts); schedule, every control mask shifted "
        "by two logit offsets so that the attention and the MLP each lose the target's share (docs/method.md)",
    )
    generator_lr: float = Field(2e-3, ge=0, description="AdamW learning rate of the generator (0 freezes it)")
    generator_every: int = Field(
        1,
        gt=0,
        description="control steps per generator update (the LoRA step runs every step); k > 1 makes "
        "control cheaper but slows the generator (docs/results.md: ATP's own cost)",
    )
    control_step: Literal["alternating", "joint"] = Field(
        "alternating",
        description="alternating: a generator update on a calibration batch, then a LoRA update; joint: "
        "one LoRA update whose backward also gives the generator its gradient (one LLM pass instead of "
        "two; docs/results.md: ATP's own cost)",
    )
    importance_prior: float = Field(
        0.0,
        ge=0,
        description="scale of a first-order Taylor prior added to the generator's logits: per layer and unit "
        "kind, the standardised log Taylor scores on baseline.calibration_batches (0 = none; docs/results.md: ATP "
        "against prune-then-tune)",
    )
    protect_loss_increase: float = Field(
        0.0,
        ge=0,
        description="KV groups whose removal alone raises the untuned model's loss on its first two calibration "
        "batches by more than this (nats) are never pruned by atp and rank first for two-step; screened once "
        "before training, two forward passes per group (0 = no screen; docs/method.md)",
    )
    generator_width: int = Field(64, gt=0, description="width of the generator's layer codes and encoder")
    temperature: float = Field(0.4, gt=0, description="Gumbel-sigmoid temperature")
    base: float = Field(3.0, description="logit offset: a fresh generator starts by keeping every unit")
    mlp_channel_multiple: int = Field(
        1, gt=0, description="kept MLP channels per layer rounded to a multiple of this when the mask is frozen"
    )

    @model_validator(mode="before")
    @classmethod
    def _elastic_budgets(cls, data: Any) -> Any:
        """A list or a range given as atp.sparsity becomes atp.sparsities; atp.sparsity is then the largest."""
        if not isinstance(data, dict) or not isinstance(data.get("sparsity"), (list, dict)):
            return data
        given = data["sparsity"]
        budgets = _budgets_from_range(given) if isinstance(given, dict) else given
        if data.get("sparsities") is not None:
            raise ValueError("give the budgets once: as atp.sparsity (a list or a range), not also as atp.sparsities")
        if not all(isinstance(b, (int, float)) for b in budgets):
            raise ValueError(f"sparsity budgets must be numbers, got {budgets!r}")
        return {**data, "sparsities": budgets, "sparsity": round(max(budgets, default=0.0), 4)}

    @field_validator("sparsities")
    @classmethod
    def _ascending_distinct(cls, budgets: list[float] | None) -> list[float] | None:
        if budgets is None:
            return None
        distinct = sorted({round(float(b), 4) for b in budgets})
        if len(distinct) < 2:
            raise ValueError(f"an elastic run needs at least 2 distinct budgets, got {budgets}")
        return distinct

    @model_validator(mode="after")
    def _largest_budget_is_sparsity(self) -> ATPSettings:
        if self.sparsities is not None and self.sparsity != self.sparsities[-1]:
            raise ValueError(
                f"atp.sparsity {self.sparsity} must be the largest of atp.sparsities {self.sparsities}: "
                "give the budgets as atp.sparsity alone (a list or a range)"
            )
        return self

    @model_validator(mode="after")
    def _schedule_takes_one_budget(self) -> ATPSettings:
        if self.sparsity_control == "schedule" and self.sparsities is not None:
            raise ValueError(
                f"atp.sparsity_control schedule takes one sparsity, not the budgets {self.sparsities} of an "
                "elastic run (it shifts the masks of one target)"
            )
        return self

    @property
    def elastic(self) -> bool:
        """Whether one run trains the generator for several budgets."""
        return self.sparsities is not None

    @property
    def budgets(self) -> tuple[float, ...]:
        """The sparsity budgets the run trains for, ascending (one for a single run)."""
        return tuple(self.sparsities) if self.sparsities is not None else (self.sparsity,)

    @model_validator(mode="after")
    def _ramp_after_control(self) -> ATPSettings:
        # The lasso ramp drives the LoRA of cut units to zero: while the mask still moves,
        # it would push on units that may come back.
        if self.control_fraction + self.lasso_ramp_fraction > 1 + 1e-9:
            raise ValueError(
                "control_fraction + lasso_ramp_fraction must be at most 1 (the lasso ramp starts after "
                f"the mask freezes), got {self.control_fraction} + {self.lasso_ramp_fraction}"
            )
        return self


IMPORTANCE_CRITERIA = tuple(IMPORTANCE)  # the two-step baseline's criteria (atp_ray.pruning.importance)
# One mask source per method; the names live here so that config needs no recipe module
# (atp_ray.training.mask_sources.MASK_SOURCES has one entry per name, in this order: a test checks).
METHODS = ("atp", "two-step", "lora")


class BaselineSettings(_Section):
    """How method=two-step picks its mask (ignored by atp and lora)."""

    importance: Literal[IMPORTANCE_CRITERIA] = Field(
        "magnitude", description="unit score: " + ", ".join(f"{n} ({c.summary})" for n, c in IMPORTANCE.items())
    )
    calibration_batches: int = Field(
        8, gt=0, description="calibration batches whose mean loss gives taylor's gradients"
    )
    mask_run: str | None = Field(
        None,
        description="a finished atp run folder of this model and atp.sparsity: two-step tunes its final "
        "mask (an elastic run's at atp.sparsity) from step 0 instead of scoring units",
    )


# Teachers of the distillation term (atp_ray.training.distillation.TEACHERS; a test keeps them equal).
DISTILL_TEACHERS = ("inplace", "dense", "tuned")


class DistillSettings(_Section):
    """Logit distillation in the LoRA step, the same for every method (atp, two-step, lora).

    The LoRA step's loss gains ``weight`` x T^2 x KL(teacher || masked model) over the
    next-token distributions at temperature T (atp_ray.training.distillation). The teacher costs one
    more forward pass of the model per micro-batch, without gradients and without a second
    copy of any weight. Under ``atp.control_step=joint`` the generator's gradient, taken from
    the LoRA step's backward, includes the term too.
    """

    weight: float = Field(
        0.0, ge=0, description="weight of the distillation KL in the LoRA step's loss (0 = off: no teacher pass)"
    )
    temperature: float = Field(
        1.0, gt=0, description="softmax temperature T of teacher and student; the KL is scaled by T^2"
    )
    teacher: Literal[DISTILL_TEACHERS] = Field(
        "inplace",
        description="inplace: the same model with the mask off and the current LoRA; dense: the untuned "
        "base model (mask off, LoRA disabled); tuned: the base model with the LoRA of a finished dense "
        "LoRA run (teacher_run)",
    )
    teacher_run: str | None = Field(
        None,
        description="teacher tuned only: the folder of a finished method=lora run of the same model, "
        "whose adapter the teacher wears",
    )
    top_k: int | None = Field(
        None,
        gt=0,
        description="KL over the teacher's k most likely tokens only, renormalised (None = the whole vocabulary)",
    )
    after_freeze: bool = Field(
        False,
        description="distil only once the mask is frozen (atp: after control; two-step and lora freeze at step 0)",
    )
    cache: str | None = Field(
        None,
        description="a file written by `atp-ray distill-cache` with this config: the teacher's top-k logits on "
        "the run's training blocks, read instead of running the teacher (dense and tuned teachers, top_k set)",
    )

    @field_validator("teacher_run", "cache")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        # A trial runs in its own working directory: a relative folder would name another place there.
        return None if path is None else str(Path(os.path.expanduser(path)).resolve())

    @property
    def cacheable(self) -> bool:
        """Whether the teacher's top-k logits can be computed once: a fixed teacher, with top_k set."""
        return self.teacher != "inplace" and self.top_k is not None

    @model_validator(mode="after")
    def _teacher_settings_agree(self) -> DistillSettings:
        if self.teacher == "tuned" and self.teacher_run is None:
            raise ValueError("teacher 'tuned' needs teacher_run: the folder of a finished method=lora run of this model")
        if self.teacher != "tuned" and self.teacher_run is not None:
            raise ValueError(f"teacher_run is read by teacher 'tuned' only (got teacher {self.teacher!r})")
        if self.cache is not None and not self.cacheable:
            raise ValueError(
                "cache holds a fixed teacher's top-k logits: it needs teacher 'dense' or 'tuned' (the in-place "
                "teacher changes as LoRA trains) and top_k set "
                f"(got teacher {self.teacher!r}, top_k {self.top_k})"
            )
        return self


class TrainConfig(_Section):
    steps: int = Field(200, gt=0, description="optimizer steps of the whole run")
    batch_size: int = Field(4, gt=0, description="training blocks per LoRA step (per process)")
    calibration_batch_size: int = Field(4, gt=0, description="calibration blocks per generator step")
    lr: float = Field(2e-4, gt=0, description="peak AdamW learning rate of LoRA")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of LoRA")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps of the LoRA learning rate")
    lr_after_freeze: Literal["continue", "restart"] = Field(
        "continue",
        description="continue: one cosine decay over the run; restart: a new cosine from the peak once the "
        "mask freezes, so LoRA recovers the final mask at full rate (a fixed mask freezes at step 0)",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm (both optimizers)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast on a GPU that supports it, else fp32"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    seed: int = Field(0, description="seeds weights of LoRA/generator, mask noise and data order")
    log_every: int = Field(10, gt=0, description="steps between metrics.jsonl rows")
    checkpoint_every: int = Field(50, gt=0, description="steps between resumable checkpoints")
    eval_every: int | None = Field(
        None, gt=0, description="steps between held-out evaluations during training (None = at the end only)"
    )
    activation_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="recompute each decoder layer's activations in the backward pass instead of keeping them "
        "(about a third more compute, a fraction of the activation memory); auto = on for a GPU run whose "
        "memory plan (atp_ray.training.memory_plan) does not fit the GPU without it, off on CPU",
    )


STRATEGY_NAMES = tuple(STRATEGIES)  # atp_ray.runtime.strategies


class DistributedConfig(_Section):
    """One run sharded over Ray Train workers (``workers`` unset: one process, no Ray)."""

    workers: int | None = Field(None, gt=0, description="Ray Train workers (None = one process, no Ray)")
    strategy: Literal[STRATEGY_NAMES] = Field(
        "ddp", description=", ".join(f"{n} ({c.summary})" for n, c in STRATEGIES.items())
    )
    use_gpu: bool = Field(False, description="one or more GPUs per worker (NCCL), else CPU workers (gloo)")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs Ray reserves for each worker, which also sets its torch threads "
        "(None: 1 for GPU workers; CPU workers share the cluster's CPUs in whole CPUs, each fitting on one node)",
    )
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs Ray reserves for each worker when use_gpu")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="PACK workers onto few nodes, or SPREAD them over many"
    )
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint (-1 = unlimited)")
    checkpoints_to_keep: int = Field(2, gt=0, description="latest Ray Train checkpoints kept in storage")
    storage_path: str | None = Field(
        None, description="Ray Train storage: folder, NFS path, s3:// or gs:// URI (None = <run folder>/ray)"
    )
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON file merged over the one we build")
    offload_optimizer: bool = Field(False, description="ZeRO: keep optimizer state in CPU memory")
    offload_params: bool = Field(False, description="ZeRO-3: keep sharded base weights in CPU memory")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches of train.batch_size per LoRA step")
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="memory of one GPU in GiB (as torch.cuda reports it); set, a GPU run whose memory plan "
        "does not fit is refused before it starts (None = unknown: the plan is printed, not checked)",
    )

    @model_validator(mode="after")
    def _options_fit_strategy(self) -> DistributedConfig:
        if self.strategy == "ddp" and (self.offload_optimizer or self.offload_params or self.deepspeed_config):
            raise ValueError("offload_optimizer, offload_params and deepspeed_config need strategy zero2 or zero3")
        if self.offload_params and self.strategy != "zero3":
            raise ValueError(f"offload_params needs strategy zero3 (got {self.strategy!r})")
        if self.strategy != "ddp" and self.workers is None:
            raise ValueError(f"strategy {self.strategy!r} runs on Ray Train: set workers (--workers N)")
        return self


class RunConfig(_Section):
    """One run: what to prune, on what data, how.

    ``method`` picks where the mask comes from: atp learns it (the generator), two-step
    scores units once and cuts them before tuning (``baseline``), lora prunes nothing
    (the dense reference). Everything else (data, LoRA, distillation, steps, learning rates) is shared.
    """

    method: Literal[METHODS] = Field("atp", description="atp | two-step (prune, then tune) | lora (dense LoRA)")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    atp: ATPSettings = Field(default_factory=ATPSettings)
    baseline: BaselineSettings = Field(default_factory=BaselineSettings)
    distill: DistillSettings = Field(default_factory=DistillSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _elastic_needs_generator(self) -> RunConfig:
        if self.atp.elastic and self.method != "atp":
            raise ValueError(
                f"several sparsity budgets ({self.atp.sparsities}) need method atp, whose generator takes the "
                f"budget as an input; method {self.method!r} prunes to one atp.sparsity"
            )
        return self

    @model_validator(mode="after")
    def _mask_run_is_two_steps(self) -> RunConfig:
        if self.baseline.mask_run is not None and self.method != "two-step":
            raise ValueError(
                f"baseline.mask_run gives method two-step its mask (got method {self.method!r}): "
                "set method=two-step or leave baseline.mask_run unset"
            )
        return self

    @model_validator(mode="after")
    def _distill_teacher_differs(self) -> RunConfig:
        # lora keeps every unit: the in-place teacher would be the student itself.
        if self.method == "lora" and self.distill.weight > 0 and self.distill.teacher == "inplace":
            raise ValueError(
                "distill.teacher 'inplace' is the unmasked model, which method lora trains itself: "
                "use distill.teacher=dense or distill.weight=0"
            )
        return self

    @model_validator(mode="after")
    def _tuned_teacher_off_deepspeed(self) -> RunConfig:
        # The teacher's adapter is loaded beside the trained one; DeepSpeed's engines were not tried with it.
        if self.distill.weight > 0 and self.distill.teacher == "tuned" and self.distributed.strategy != "ddp":
            raise ValueError(
                f"distill.teacher 'tuned' runs with distributed.strategy ddp only (got {self.distributed.strategy!r}): "
                "use distill.teacher=dense or inplace under DeepSpeed"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- loading ---------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` pairs on a raw config dict; values are parsed as YAML."""
    problems = _apply_overrides(raw, overrides)
    if problems:
        raise ConfigError(problems)
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply every well-formed override; return one problem per malformed one (the rest still apply)."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected dotted.key=value")
            continue
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"override {item!r}: {part} is not a section")
                break
            node = child
        else:
            try:
                node[leaf] = yaml.safe_load(value)
            except yaml.YAMLError:
                problems.append(f"override {item!r}: value is not valid YAML")
    return problems


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "missing":
        return f"{where}: required"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (got {error['input']!r})"
    if isinstance(error["input"], dict):  # a rule across keys: its message names the values
        return f"{where}: {error['msg'].lower()}"
    return f"{where}: {error['msg'].lower()} (got {error['input']!r})"


def model_path_problems(path: Any) -> list[str]:
    """Problems with ``model.path`` that can be seen without loading the model."""
    if not isinstance(path, str) or path == EMBEDDED_MODEL:
        return []
    folder = Path(os.path.expanduser(path))
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            return [f"model.path: {path!r} has no config.json (not a transformers model folder)"]
        return _architecture_problems(path, yaml.safe_load(config_file.read_text()).get("model_type"))
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        return [f"model.path: no such folder, and not a hub id (got {path!r})"]
    return []  # a hub id: checked when loaded (these machines cannot reach the hub)


def _file_problems(raw: dict[str, Any]) -> list[str]:
    """Missing local files a config names (a data file, a DeepSpeed JSON), seen even when other fields are wrong."""
    problems = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    try:
        source = _expand_source(data.get("source"))
    except ValueError:
        source = None  # reported by validation
    if isinstance(source, dict) and source.get("kind") == "file" and isinstance(source.get("path"), str):
        if not Path(source["path"]).expanduser().is_file():
            problems.append(f"data.source.path: no such file (got {source['path']!r})")
    dist = raw.get("distributed") if isinstance(raw.get("distributed"), dict) else {}
    ds_file = dist.get("deepspeed_config")
    if isinstance(ds_file, str):
        try:
            if not isinstance(json.loads(Path(ds_file).expanduser().read_text()), dict):
                problems.append(f"distributed.deepspeed_config: not a JSON object (got {ds_file!r})")
        except FileNotFoundError:
            problems.append(f"distributed.deepspeed_config: no such file (got {ds_file!r})")
        except json.JSONDecodeError as err:
            problems.append(f"distributed.deepspeed_config: not valid JSON ({err}) (got {ds_file!r})")
    return problems


def _architecture_problems(path: str, model_type: str | None) -> list[str]:
    try:
        family_of(model_type)
    except UnsupportedArchitectureError as err:
        return [f"model.path: {err} (got {path!r})"]
    return []


def _read_mapping(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A config as a dict: given directly, or read from a YAML file (ConfigError if not a mapping)."""
    if isinstance(source, dict):
        return dict(source)
    try:
        raw = yaml.safe_load(Path(source).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {source}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{source}: not valid YAML ({err})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping of sections, got {type(raw).__name__}"])
    return raw


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raises ConfigError listing every problem."""
    raw = _read_mapping(source)
    problems = _apply_overrides(raw, overrides or [])
    config = None
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems += [_describe(e) for e in err.errors()]
    model = raw.get("model")
    problems += model_path_problems(model.get("path") if isinstance(model, dict) else None)
    problems += _file_problems(raw)
    if problems:
        raise ConfigError(problems)
    return config


def load_task_config(source: str | Path | dict[str, Any]) -> TaskConfig:
    """Read and validate an evaluation task YAML; raises ConfigError listing every problem."""
    try:
        return TaskConfig.model_validate(_read_mapping(source))
    except ValidationError as err:
        where = "" if isinstance(source, dict) else f"{source}: "
        raise ConfigError([where + _describe(e) for e in err.errors()]) from None
