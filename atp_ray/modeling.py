"""Loading base models and tokenizers by hub id, local folder or the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from atp_ray.embedded import EMBEDDED_MODEL, embedded_model_path
from atp_ray.structures import check_supported

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """The folder or hub id that transformers should load for a ``model.path`` value."""
    return str(embedded_model_path()) if path == EMBEDDED_MODEL else path


def local_model_type(path: str) -> str | None:
    """model_type from a local folder's config.json; None for hub ids (not readable offline)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text()).get("model_type")


def load_model(path: str, dtype: str = "float32") -> PreTrainedModel:
    """A causal LM of a supported architecture, in ``dtype``, on the CPU, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=DTYPES[dtype])
    check_supported(model.config.model_type)
    return model.eval()


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, with a pad token (the EOS token when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
