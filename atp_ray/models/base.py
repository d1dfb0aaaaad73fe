"""What atp-ray knows about one decoder family, in one object: :class:`ModelFamily`.

A family is a transformers ``model_type`` whose layers atp-ray can prune: where its units'
weights are (its :class:`~atp_ray.models.layout.DecoderLayout`), which of those projections carry
a bias, and how its attention module records the query heads per KV head. Everything else
(parameter counts, default LoRA targets, masking, surgery) is derived from these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from atp_ray.models.layout import DecoderLayout

# A transformers config -> names of the projections (Slice.name) that carry a bias.
BiasRule = Callable[[Any], frozenset[str]]


@dataclass(frozen=True)
class ModelFamily:
    """One supported decoder family: its layout and its bias rule."""

    model_type: str  # config.model_type, the registry key
    layout: DecoderLayout
    biased: BiasRule

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Every projection some unit owns part of: LoRA on all of them by default."""
        return self.layout.projections

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of a decoder layer."""
        return layer.get_submodule(self.layout.attention_path)

    def set_attention(self, layer: nn.Module, attention: nn.Module) -> None:
        """Put ``attention`` where this family's attention module is in ``layer``."""
        parent, _, name = self.layout.attention_path.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, attention)

    def set_queries_per_group(self, attention: nn.Module, count: int) -> None:
        """Tell an attention module how many query heads share each KV head (after surgery).

        transformers' attention modules read ``num_key_value_groups`` in ``repeat_kv``; a
        family whose module names it otherwise overrides this.
        """
        attention.num_key_value_groups = count
