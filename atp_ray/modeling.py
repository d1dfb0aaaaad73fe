"""Loading base models and tokenizers by hub id, local folder or the embedded default."""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from atp_ray.embedded import EMBEDDED_MODEL, embedded_model_path
from atp_ray.errors import ModelNotFoundError, RunFolderError
from atp_ray.run_folder import RunFolder
from atp_ray.structures import PruningSpace, UnitGroup, check_supported

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """The folder or hub id that transformers should load for a ``model.path`` value."""
    return str(embedded_model_path()) if path == EMBEDDED_MODEL else path


def _unreachable(path: str, err: Exception) -> ModelNotFoundError:
    if path.startswith((".", "/", "~")):
        return ModelNotFoundError(f"model path {path!r}: no such model folder")
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"model.path: cannot load {path!r}: not a local model folder, and the hub says: {first_line}"
    )


def check_model_reachable(path: str) -> None:
    """Read the model's config (local folder, hub or cache) now, so a bad path fails before any work."""
    try:
        AutoConfig.from_pretrained(resolve_model_path(path))
    except (OSError, HFValidationError) as err:
        raise _unreachable(path, err) from None


def load_model(path: str, dtype: str = "float32") -> PreTrainedModel:
    """A causal LM of a supported architecture, in ``dtype``, on the CPU, in eval mode."""
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=DTYPES[dtype])
    except (OSError, HFValidationError) as err:
        raise _unreachable(path, err) from None
    check_supported(model.config.model_type)
    return model.eval()


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, with a pad token (the EOS token when it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    except (OSError, HFValidationError) as err:
        raise _unreachable(path, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_run_model(run_dir: str | Path) -> tuple[PreTrainedModel, PruningSpace, dict[UnitGroup, torch.Tensor]]:
    """A finished run's model with its LoRA merged, plus its pruning space and final hard mask.

    The mask is not applied: wrap calls in ``atp_ray.masking.masked(model, space, masks)``
    to get the pruned model's outputs, or compress it with ``atp_ray.compress``.
    """
    from peft import PeftModel

    folder = RunFolder(Path(run_dir))
    if not folder.mask.is_file() or not folder.adapter.is_dir():
        raise RunFolderError(f"{run_dir} holds no finished ATP run (mask.json and adapter/ are missing)")
    model_cfg = folder.read_config()["model"]
    base = load_model(model_cfg["path"], model_cfg.get("dtype", "float32"))
    model = PeftModel.from_pretrained(base, folder.adapter).merge_and_unload().eval()
    space = PruningSpace.from_config(model.config)
    return model, space, folder.read_mask(space)
