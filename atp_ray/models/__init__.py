"""The supported decoder families, one module each; :data:`MODEL_FAMILIES` is the list.

Adding a family is one module (its layout, or a shared one, and its bias rule) and one
entry here; config validation, pruning, masking and surgery all look families up here.
"""

from __future__ import annotations

from torch import nn

from atp_ray.errors import UnsupportedArchitectureError
from atp_ray.models.base import ModelFamily
from atp_ray.models.llama import LLAMA
from atp_ray.models.mistral import MISTRAL
from atp_ray.models.qwen2 import QWEN2

MODEL_FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (LLAMA, MISTRAL, QWEN2)}

# The config's default lora.target_modules: every projection of every family (peft skips the names a
# model lacks, so one default serves all of them).
DEFAULT_LORA_TARGETS = tuple(dict.fromkeys(t for family in MODEL_FAMILIES.values() for t in family.lora_targets))


def family_of(model_type: str | None) -> ModelFamily:
    """The family of a config's ``model_type``; UnsupportedArchitectureError if atp-ray cannot prune it."""
    if model_type not in MODEL_FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; "
            f"supported model_type values: {', '.join(sorted(MODEL_FAMILIES))}"
        )
    return MODEL_FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM of a supported family, a peft-wrapped one included."""
    return family_of(getattr(getattr(model, "config", None), "model_type", None)).layout.layers(model)
