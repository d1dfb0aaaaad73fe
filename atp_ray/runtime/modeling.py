"""Loading base models and tokenizers by hub id, local folder or the embedded default."""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer

from atp_ray.errors import ModelNotFoundError, RunFolderError
from atp_ray.models import family_of
from atp_ray.models.embedded import EMBEDDED_MODEL, embedded_model_path
from atp_ray.pruning.structures import PruningSpace, UnitGroup
from atp_ray.runtime.run_folder import RunFolder

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


# A local folder holding one of these has a tokenizer for AutoTokenizer.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")
# Seconds the one hub probe of an uncached hub id may take (connect and answer).
HUB_PROBE_TIMEOUT_S = 5.0
_probed: set[str] = set()  # hub ids the hub has answered for in this process


def _check_local_folder(folder: Path, path: str, needs: tuple[str, ...]) -> None:
    """A folder must hold one of ``needs`` (config.json for a model); say what it is instead when not."""
    if any((folder / name).is_file() for name in needs):
        return
    run = RunFolder(folder)
    if run.config.is_file():
        raise RunFolderError(
            f"{path}: an ATP run folder that has not finished (no mask.json, adapter/ or summary.json yet); "
            f"finish it first (atp-ray train with the same config and --out {path} resumes it)"
        )
    raise ModelNotFoundError(
        f"{path}: not a model folder (it has no {needs[0]}); expected a transformers model folder, "
        "a finished ATP run folder or a compressed model folder"
    )


def _probe_hub(repo_id: str) -> None:
    """Ask the hub once, without retries, whether it serves ``repo_id``; a model in the local cache needs no probe.

    For a file that is not cached, transformers retries an unreachable hub five times with
    back-off (about 25 s and 20 warning lines per file, two files per load) before its one
    useful error. A cached file loads at once even offline, so only uncached ids are probed.
    The probe is a HEAD request for ``config.json``: nothing is downloaded.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if repo_id in _probed or constants.HF_HUB_OFFLINE:  # offline mode fails fast by itself
        return
    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError as err:
        raise _unreachable(repo_id, err) from None
    if isinstance(cached, str):
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return  # transformers explains gated access (log in, accept the terms) itself
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model.path: {repo_id!r} is not a local model folder, and the hub has no such model "
            "(or it is private: log in with `hf auth login`)"
        ) from None
    except EntryNotFoundError:
        raise ModelNotFoundError(
            f"model.path: {repo_id!r} is a hub repository without config.json, not a transformers model"
        ) from None
    except HfHubHTTPError:
        return  # the hub answered (an error of its own): transformers reports it
    except Exception as err:  # noqa: BLE001 - any failure to get an answer (DNS, refused, timeout, proxy)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"model.path: {repo_id!r} is not a local model folder nor in the local hub cache, and the "
            f"Hugging Face Hub cannot be reached ({reason}); on a machine without hub access, point "
            "model.path at a local model folder"
        ) from None
    _probed.add(repo_id)


def _checked_path(path: str, needs: tuple[str, ...] = ("config.json",)) -> str:
    """The path to give transformers, after checks that fail fast and clearly on a bad one.

    ``needs``: a local folder must hold one of these files (a tokenizer-only folder has no config.json).
    """
    resolved = resolve_model_path(path)
    folder = Path(resolved).expanduser()
    if folder.is_dir():
        _check_local_folder(folder, path, needs)
        return resolved
    if path.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {path!r}: no such model folder")
    _probe_hub(resolved)
    return resolved


def check_model_reachable(path: str) -> None:
    """Read the model's config (local folder, hub or cache) now, so a bad path fails before any work."""
    try:
        AutoConfig.from_pretrained(_checked_path(path))
    except (OSError, HFValidationError) as err:
        raise _unreachable(path, err) from None


def load_model(path: str, dtype: str = "float32") -> PreTrainedModel:
    """A causal LM of a supported architecture, in ``dtype``, on the CPU, in eval mode."""
    try:
        model = AutoModelForCausalLM.from_pretrained(_checked_path(path), dtype=DTYPES[dtype])
    except (OSError, HFValidationError) as err:
        raise _unreachable(path, err) from None
    family_of(model.config.model_type)  # raises UnsupportedArchitectureError for a family we cannot prune
    return model.eval()


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations (peft models too).

    Non-reentrant checkpointing: the recomputation runs the layer's submodules' forward hooks
    again, so a backward must run while the masks it was computed under are still applied
    (inside ``masked``); it keeps the RNG state, so LoRA dropout draws the same masks twice.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def eval_for_backward(model: torch.nn.Module) -> None:
    """Eval mode (no dropout) for a pass that is still backpropagated, checkpointing kept.

    transformers checkpoints a decoder layer only while that layer's own ``training`` flag is
    set; nothing else reads that flag (its attention, MLP and LoRA dropout have their own), so
    it is set back on the layers that checkpoint, and every other module stays in eval mode.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, with a pad token (the EOS token when it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(_checked_path(path, needs=TOKENIZER_FILES))
    except (OSError, HFValidationError) as err:
        raise _unreachable(path, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_run_model(
    run_dir: str | Path, sparsity: float | None = None
) -> tuple[PreTrainedModel, PruningSpace, dict[UnitGroup, torch.Tensor]]:
    """A finished run's model with its LoRA merged, plus its pruning space and final hard mask.

    ``sparsity``: the budget whose mask to return. An elastic run needs one of its budgets
    (RunFolderError naming them otherwise); a single run has one mask and takes None. The
    mask is read before the model loads, so a wrong budget fails at once.

    The mask is not applied: wrap calls in ``atp_ray.pruning.masking.masked(model, space, masks)``
    to get the pruned model's outputs, or compress it with ``atp_ray.compression.compress``.
    """
    from peft import PeftModel

    folder = RunFolder(Path(run_dir))
    if not folder.root.is_dir():
        raise RunFolderError(f"{run_dir}: no such folder")
    if not folder.mask.is_file() or not folder.adapter.is_dir():
        raise RunFolderError(f"{run_dir} holds no finished ATP run (mask.json and adapter/ are missing)")
    model_cfg = folder.read_config()["model"]
    try:
        space = PruningSpace.from_config(AutoConfig.from_pretrained(_checked_path(model_cfg["path"])))
    except (OSError, HFValidationError) as err:
        raise _unreachable(model_cfg["path"], err) from None
    masks = folder.read_mask(space, budget=sparsity)
    base = load_model(model_cfg["path"], model_cfg.get("dtype", "float32"))
    model = PeftModel.from_pretrained(base, folder.adapter).merge_and_unload().eval()
    return model, space, masks


def teacher_adapter(teacher_run: str, model_path: str) -> Path:
    """The adapter folder of ``teacher_run``, checked to be a finished dense LoRA run of ``model_path``.

    The tuned distillation teacher wears that adapter on the run's own base weights, so it must
    have been trained on the same model and with nothing pruned (RunFolderError otherwise).
    """
    folder = RunFolder(Path(teacher_run))
    if not folder.is_finished() or not folder.adapter.is_dir():
        raise RunFolderError(
            f"distill.teacher_run {teacher_run}: no finished run there (summary.json and adapter/ are missing); "
            "train the teacher first with method=lora"
        )
    saved = folder.read_config()
    if saved.get("method") != "lora":
        raise RunFolderError(
            f"distill.teacher_run {teacher_run}: a method={saved.get('method')} run; the tuned teacher is a "
            "dense LoRA run (method=lora), whose model is whole"
        )
    if saved["model"]["path"] != model_path:
        raise RunFolderError(
            f"distill.teacher_run {teacher_run}: tuned {saved['model']['path']!r}, but this run trains "
            f"{model_path!r}; the teacher's adapter fits only its own base model"
        )
    return folder.adapter
