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

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from atp_ray.compression.surgery import KeptUnits, LayerWidths, shrink_layer
from atp_ray.errors import CompressionError
from atp_ray.models import family_of
from atp_ray.models.layout import count_params  # count_params: re-exported for callers
from atp_ray.pruning.structures import Masks, PruningSpace
from atp_ray.runtime.modeling import DTYPES, load_run_model, load_tokenizer
from atp_ray.runtime.run_folder import RunFolder, atomic_write_json

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


def compress_run(run_dir: str | Path, out: str | Path) -> CompressionRecord:
    """Merge a finished run's LoRA, cut its pruned units and save the model with its tokenizer."""
    model, space, masks = load_run_model(run_dir)
    config = RunFolder(Path(run_dir)).read_config()
    source = config["model"]["path"]
    record = compress_model(model, space, masks, source_model=source)
    record = replace(record, training_data=config.get("data"), seed=config.get("train", {}).get("seed"))
    save_compressed(model, load_tokenizer(source), record, out)
    return record


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
