"""Validated run configs: YAML and ``dotted.key=value`` overrides in, typed objects out.

Every problem in a config is reported at once, each naming the field, the rule and the
value given, before any model is loaded. Sparsity always means the fraction of prunable
parameters removed (0 keeps everything); the engine works with the kept fraction
``1 - sparsity`` internally and names it so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atp_ray.embedded import EMBEDDED_MODEL
from atp_ray.errors import ConfigError, UnsupportedArchitectureError
from atp_ray.structures import check_supported

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
        default_factory=lambda: list(ALL_PROJECTIONS),
        min_length=1,
        description="projections that get LoRA (any of the seven in every decoder layer)",
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
    """An offline corpus read from an installed package (see ``atp_ray.sources.BUILTIN_SOURCES``)."""

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


class ATPSettings(_Section):
    sparsity: float = Field(0.3, ge=0, le=0.95, description="target fraction of prunable parameters removed")
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
    freeze_patience: int = Field(20, gt=0, description="generator steps the tolerance must hold to freeze early")
    control_extension_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="share of steps the control phase may run past its end while the noise-free mask "
        "misses the target by more than freeze_tolerance",
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
    generator_lr: float = Field(2e-3, ge=0, description="AdamW learning rate of the generator (0 freezes it)")
    generator_width: int = Field(64, gt=0, description="width of the generator's layer codes and encoder")
    temperature: float = Field(0.4, gt=0, description="Gumbel-sigmoid temperature")
    base: float = Field(3.0, description="logit offset: a fresh generator starts by keeping every unit")


class TrainConfig(_Section):
    steps: int = Field(200, gt=0, description="optimizer steps of the whole run")
    batch_size: int = Field(4, gt=0, description="training blocks per LoRA step (per process)")
    calibration_batch_size: int = Field(4, gt=0, description="calibration blocks per generator step")
    lr: float = Field(2e-4, gt=0, description="peak AdamW learning rate of LoRA")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of LoRA")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps of the LoRA learning rate")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm (both optimizers)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast on a GPU that supports it, else fp32"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    seed: int = Field(0, description="seeds weights of LoRA/generator, mask noise and data order")
    log_every: int = Field(10, gt=0, description="steps between metrics.jsonl rows")
    checkpoint_every: int = Field(50, gt=0, description="steps between resumable checkpoints")


class RunConfig(_Section):
    """One ATP run: what to prune, on what data, how."""

    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    atp: ATPSettings = Field(default_factory=ATPSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- loading ---------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` pairs on a raw config dict; values are parsed as YAML."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"override {item!r}: expected dotted.key=value"])
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"override {item!r}: {part} is not a section"])
            node = child
        node[leaf] = yaml.safe_load(value)
    return raw


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "missing":
        return f"{where}: required"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (got {error['input']!r})"
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


def _architecture_problems(path: str, model_type: str | None) -> list[str]:
    try:
        check_supported(model_type)
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
    raw = apply_overrides(_read_mapping(source), overrides or [])
    problems: list[str] = []
    config = None
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems += [_describe(e) for e in err.errors()]
    model = raw.get("model")
    problems += model_path_problems(model.get("path") if isinstance(model, dict) else None)
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
