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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class DataConfig(_Section):
    source: str = Field("builtin:hpo", description="where the domain text comes from")
    seq_len: int = Field(128, gt=0, description="tokens per training block")
    max_documents: int | None = Field(None, gt=0, description="cap on documents read (None = all)")
    calibration_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of blocks for the generator")
    eval_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of blocks held out for evaluation")


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
    generator_lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the generator")
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


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raises ConfigError listing every problem."""
    if isinstance(source, dict):
        raw = dict(source)
    else:
        try:
            raw = yaml.safe_load(Path(source).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError([f"config file not found: {source}"]) from None
        except yaml.YAMLError as err:
            raise ConfigError([f"{source}: not valid YAML ({err})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping of sections, got {type(raw).__name__}"])
    raw = apply_overrides(raw, overrides or [])
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
