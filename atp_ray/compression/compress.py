"""Compressed models: cut a pruned model's removed units out of its merged weights; save and load it.

A compressed model folder is an ordinary transformers folder (config.json with the
*source* shapes, model.safetensors with the smaller tensors, the tokenizer) plus
``compression.json``, which records every layer's kept widths. The config keeps the
source's head counts and sizes on purpose: ``head_dim``, the softmax scale and RoPE are
derived from them and must not change. Because the widths differ per layer, a plain
``AutoModelForCausalLM.from_pretrained`` cannot rebuild the model (see docs/compression.md);
:func:`load_compressed` can.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from atp_ray.compression.surgery import KeptUnits, LayerWidths, shrink_layer
from atp_ray.errors import CompressionError, RunFolderError
from atp_ray.models import family_of
from atp_ray.models.layout import count_params  # count_params: re-exported for callers
from atp_ray.pruning.structures import Masks, PruningSpace
from atp_ray.runtime.modeling import DTYPES, load_run_model, load_tokenizer
from atp_ray.runtime.run_folder import RunFolder, atomic_write_json, budget_key

log = logging.getLogger(__name__)

COMPRESSION_FILE = "compression.json"
FORMAT = "atp-ray-compressed"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CompressionRecord:
    """What ``compression.json`` holds: where the model came from and how wide each layer is."""

    source_model: str
    model_type: str
    sparsity: float  # fraction of the source's prunable parameters removed
    dense_params: int
    params: int
    layers: tuple[LayerWidths, ...]
    # The run it was cut from, when known: its data config and seed, so that evaluation can
    # score the compressed model on the very held-out split its run never trained on.
    training_data: dict[str, Any] | None = None
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompressionRecord:
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise CompressionError(
                f"{COMPRESSION_FILE}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
                f"got {data.get('format')!r} version {data.get('version')!r}"
            )
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        return cls(**{**fields, "layers": tuple(LayerWidths(**w) for w in fields["layers"])})


def is_compressed(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` is a compressed model folder (it holds ``compression.json``)."""
    return (Path(model_dir) / COMPRESSION_FILE).is_file()


def read_record(model_dir: str | Path) -> CompressionRecord:
    """The compression record of a compressed model folder."""
    path = Path(model_dir) / COMPRESSION_FILE
    if not path.is_file():
        raise CompressionError(f"{model_dir} is not a compressed model folder: {COMPRESSION_FILE} is missing")
    return CompressionRecord.from_json(json.loads(path.read_text()))


# -- compressing --------------------------------------------------------------------------
def kept_units(space: PruningSpace, masks: Masks, layer: int) -> KeptUnits:
    """The units a hard mask keeps in ``layer``.

    KV heads are kept only while some query head reads them: a layer whose query slots
    are all off loses its KV heads too, since nothing could use them.
    """
    queries = space.query_head_mask(masks, layer).nonzero().flatten()
    kv = space.kv_head_mask(masks, layer).nonzero().flatten() if len(queries) else queries
    return KeptUnits(kv, queries, space.mlp_mask(masks, layer).nonzero().flatten())


def _check_hard(space: PruningSpace, masks: Masks) -> None:
    for group in space.groups:
        values = masks[group]
        if not torch.all((values == 0) | (values == 1)):
            raise CompressionError(f"mask for {group.name} is not hard: every value must be 0 or 1")


@torch.no_grad()
def compress_model(model: PreTrainedModel, space: PruningSpace, masks: Masks, source_model: str) -> CompressionRecord:
    """Remove the units ``masks`` drops from ``model``, in place; LoRA must already be merged.

    The result computes what the masked model computes (``atp_ray.pruning.masking.masked``).
    """
    if hasattr(model, "peft_config"):
        raise CompressionError("merge the LoRA adapter first (merge_and_unload): a peft model cannot be sliced")
    _check_hard(space, masks)
    dense = count_params(model)
    widths = []
    for index, layer in enumerate(space.layout.layers(model)):
        kept = kept_units(space, masks, index)
        shrink_layer(layer, kept, space.family)
        widths.append(kept.widths)
    params = count_params(model)
    return CompressionRecord(
        source_model=source_model,
        model_type=space.model_type,
        sparsity=(dense - params) / space.prunable_params,
        dense_params=dense,
        params=params,
        layers=tuple(widths),
    )


def save_compressed(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, record: CompressionRecord, out: str | Path
) -> Path:
    """Write a compressed model folder; it appears complete or not at all."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressionError(f"output folder {out} already exists and is not empty")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    atomic_write_json(partial / COMPRESSION_FILE, record.to_json())
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out


# How close a sparsity asked of a run must be to one of its budgets (budgets have 4 decimals).
BUDGET_TOLERANCE = 1e-6


def budget_folder(out: str | Path, sparsity: float) -> Path:
    """Where :func:`compress_budgets` writes the model of one budget: ``out/sparsity-{key}``."""
    return Path(out) / f"sparsity-{budget_key(sparsity)}"


def run_budgets(run_dir: str | Path) -> tuple[float, ...]:
    """The sparsity budgets a finished run has masks for, ascending; one for a single run.

    A single run's budget is its target (``atp.sparsity``; 0 for ``method: lora``, which
    prunes nothing), or the sparsity its mask achieved when its config names none.
    """
    folder = _finished(run_dir)
    budgets = folder.mask_budgets()
    if budgets is not None:
        return tuple(budgets)
    config = folder.read_config() or {}
    if config.get("method") == "lora":
        return (0.0,)
    target = (config.get("atp") or {}).get("sparsity")
    return (float(target) if target is not None else json.loads(folder.mask.read_text())["sparsity"],)


def is_elastic_run(run_dir: str | Path) -> bool:
    """Whether a finished run holds one mask per sparsity budget (RunFolderError if it is no finished run)."""
    return _finished(run_dir).mask_budgets() is not None


def _finished(run_dir: str | Path) -> RunFolder:
    folder = RunFolder(Path(run_dir))
    if not folder.root.is_dir():
        raise RunFolderError(f"{run_dir}: no such folder")
    if not folder.mask.is_file() or not folder.adapter.is_dir():
        raise RunFolderError(f"{run_dir} holds no finished ATP run (mask.json and adapter/ are missing)")
    return folder


def _match_budget(run_dir: str | Path, budgets: tuple[float, ...], elastic: bool, sparsity: float) -> float:
    """The run's own budget that ``sparsity`` names (CompressionError naming them when none does)."""
    for budget in budgets:
        if abs(sparsity - budget) <= BUDGET_TOLERANCE:
            return budget
    if elastic:
        names = ", ".join(budget_key(b) for b in budgets)
        raise CompressionError(f"{run_dir}: an elastic run of budgets {names} has no mask at sparsity {sparsity:g}")
    raise CompressionError(
        f"{run_dir}: a single run with target sparsity {budgets[0]:g}; it cannot be compressed at {sparsity:g} "
        "(train an elastic run, atp.sparsity: [..], for several sizes)"
    )


def _with_run_info(record: CompressionRecord, run_dir: str | Path) -> CompressionRecord:
    config = RunFolder(Path(run_dir)).read_config()
    return replace(record, training_data=config.get("data"), seed=config.get("train", {}).get("seed"))


def compress_run(run_dir: str | Path, out: str | Path, *, sparsity: float | None = None) -> CompressionRecord:
    """Merge a finished run's LoRA, cut its pruned units and save the model with its tokenizer in ``out``.

    ``sparsity``: which mask to cut. An elastic run needs one of its budgets; a single run
    takes None or its own target. Anything else is a CompressionError, before any model loads.
    """
    folder, elastic = RunFolder(Path(run_dir)), is_elastic_run(run_dir)
    if sparsity is None and elastic:
        names = ", ".join(budget_key(b) for b in run_budgets(run_dir))
        raise CompressionError(
            f"{run_dir}: an elastic run has one model per budget; choose a sparsity ({names}), "
            "or compress them all with compress_budgets"
        )
    budget = None if sparsity is None else _match_budget(run_dir, run_budgets(run_dir), elastic, sparsity)
    model, space, masks = load_run_model(run_dir, sparsity=budget if elastic else None)
    source = folder.read_config()["model"]["path"]
    record = _with_run_info(compress_model(model, space, masks, source_model=source), run_dir)
    save_compressed(model, load_tokenizer(source), record, out)
    return record


def compress_budgets(
    run_dir: str | Path, out: str | Path, sparsities: Sequence[float] | None = None
) -> dict[float, CompressionRecord]:
    """Compress a run at each of ``sparsities`` (every budget it has when None) into ``out/sparsity-{key}/``.

    Each folder appears whole or not at all (:func:`save_compressed`); one that is already
    complete is kept, so a rerun after a crash does only what is missing. The run's model
    loads and merges once; every budget is cut from a copy of it (the last from the model
    itself), so memory peaks at two dense models. Returns each budget's record, keyed by
    the run's own budget value.
    """
    folder, elastic = RunFolder(Path(run_dir)), is_elastic_run(run_dir)
    budgets = run_budgets(run_dir)
    chosen = budgets if sparsities is None else [_match_budget(run_dir, budgets, elastic, s) for s in sparsities]
    chosen = sorted(set(chosen))
    records = {b: read_record(budget_folder(out, b)) for b in chosen if is_compressed(budget_folder(out, b))}
    for budget in records:
        log.info("%s: already compressed, kept", budget_folder(out, budget))
    todo = [b for b in chosen if b not in records]
    if not todo:
        return records
    source = folder.read_config()["model"]["path"]
    tokenizer = load_tokenizer(source)
    merged, space, _ = load_run_model(run_dir, sparsity=todo[0] if elastic else None)
    for budget in todo:
        masks = folder.read_mask(space, budget=budget if elastic else None)
        model = merged if budget == todo[-1] else copy.deepcopy(merged)
        records[budget] = _with_run_info(compress_model(model, space, masks, source_model=source), run_dir)
        save_compressed(model, tokenizer, records[budget], budget_folder(out, budget))
    return dict(sorted(records.items()))


# -- loading ------------------------------------------------------------------------------
def _read_weights(model_dir: Path) -> dict[str, Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(model_dir / name))
    return state


def _fill(model: PreTrainedModel, model_dir: Path) -> None:
    try:
        result = model.load_state_dict(_read_weights(model_dir), strict=False, assign=True)
    except RuntimeError as err:  # size mismatches: the record and the weights disagree
        raise CompressionError(f"{model_dir}: weights do not match {COMPRESSION_FILE}: {err}") from err
    model.tie_weights()
    empty = [name for name, param in model.named_parameters() if param.is_meta]
    if empty or result.unexpected_keys:
        raise CompressionError(
            f"{model_dir}: weights do not match {COMPRESSION_FILE} "
            f"(missing: {empty[:5]}, unexpected: {sorted(result.unexpected_keys)[:5]})"
        )


def load_compressed(model_dir: str | Path, dtype: str | None = None) -> PreTrainedModel:
    """A compressed model folder as an ordinary transformers model (the source's class), in eval mode.

    The skeleton's parameters live on the meta device (no memory; buffers such as RoPE
    tables are real), are shrunk to the recorded widths, then replaced by the tensors of
    the safetensors file(s); ``dtype`` (e.g. "float32") casts after loading.
    """
    model_dir = Path(model_dir)
    record = read_record(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if config.num_hidden_layers != len(record.layers):
        raise CompressionError(
            f"{model_dir}: config has {config.num_hidden_layers} layers, {COMPRESSION_FILE} {len(record.layers)}"
        )
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    family = family_of(record.model_type)
    for layer, widths in zip(family.layout.layers(model), record.layers):
        shrink_layer(layer, KeptUnits.first(widths), family)
    _fill(model, model_dir)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    if dtype is not None:
        model.to(DTYPES[dtype])
    return model.eval()
