"""Prunable structures of a transformers decoder and their exact parameter counts.

Per decoder layer we prune attention heads and MLP intermediate channels; the hidden
width stays. Attention units are GQA-aware by construction: the query heads of a layer
form a grid of ``num_kv_heads`` KV groups x ``queries_per_group`` slots (query head
``h = group * queries_per_group + slot``, the order ``repeat_kv`` uses), and a unit is
either a whole KV group (its K/V heads and all its query heads) or one slot across
every group. Whatever the mask, each kept group keeps the same query heads, so the
compressed layer still runs in the stock attention with one ``num_key_value_groups``.
Without GQA (one query head per KV head) the slot units are omitted.

A mask for the space is a mapping ``UnitGroup -> Tensor[size]`` of values in [0, 1]
(1 = keep); hard masks hold exactly 0 or 1.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atp_ray.models import ModelFamily, family_of
from atp_ray.models.layout import Axis, DecoderLayout, Role


class UnitKind(str, enum.Enum):
    """What one prunable unit of a layer is."""

    KV_GROUP = "kv_group"
    QUERY_SLOT = "query_slot"
    MLP_CHANNEL = "mlp_channel"


@dataclass(frozen=True)
class UnitGroup:
    """All units of one kind in one decoder layer; the generator emits one logit per unit."""

    layer: int
    kind: UnitKind
    size: int

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.kind.value}"


Masks = Mapping[UnitGroup, Tensor]

# The attention's unit kinds, counted together: a KV group owns its query heads.
ATTENTION_KINDS = (UnitKind.KV_GROUP, UnitKind.QUERY_SLOT)


@dataclass(frozen=True)
class PruningSpace:
    """The prunable units of a decoder and the parameters each one owns."""

    model_type: str
    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    biased: frozenset[str]  # projections that carry a bias (the family's rule read from the config)
    groups: tuple[UnitGroup, ...]

    @classmethod
    def from_config(cls, config: Any) -> PruningSpace:
        """Build the space of a transformers config of a supported family (atp_ray.models)."""
        family = family_of(getattr(config, "model_type", None))
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        queries_per_group = num_heads // num_kv_heads
        groups: list[UnitGroup] = []
        for layer in range(config.num_hidden_layers):
            groups.append(UnitGroup(layer, UnitKind.KV_GROUP, num_kv_heads))
            if queries_per_group > 1:
                groups.append(UnitGroup(layer, UnitKind.QUERY_SLOT, queries_per_group))
            groups.append(UnitGroup(layer, UnitKind.MLP_CHANNEL, config.intermediate_size))
        return cls(
            model_type=family.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            head_dim=head_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            intermediate_size=config.intermediate_size,
            biased=family.biased(config),
            groups=tuple(groups),
        )

    # -- shape -----------------------------------------------------------------------
    @property
    def family(self) -> ModelFamily:
        return family_of(self.model_type)

    @property
    def layout(self) -> DecoderLayout:
        """Where each unit's weights are in a decoder layer of this architecture."""
        return self.family.layout

    @property
    def queries_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def group(self, layer: int, kind: UnitKind) -> UnitGroup | None:
        """The unit group of ``kind`` in ``layer``, or None if the space has none."""
        for g in self.groups:
            if g.layer == layer and g.kind == kind:
                return g
        return None

    # -- parameter accounting ------------------------------------------------------------
    def units(self, role: Role) -> int:
        """Units of ``role`` in one layer: query heads, KV heads or MLP channels."""
        return {Role.QUERY_HEAD: self.num_heads, Role.KV_HEAD: self.num_kv_heads, Role.MLP_CHANNEL: self.intermediate_size}[role]

    def unit_width(self, role: Role) -> int:
        """Rows or columns one unit of ``role`` owns in each of its slices."""
        return 1 if role is Role.MLP_CHANNEL else self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every projection of a decoder layer that some unit owns part of."""
        shapes = {}
        for role, pieces in self.layout.slices.items():
            owned = self.units(role) * self.unit_width(role)
            for piece in pieces:
                shapes[piece.name] = (self.hidden_size, owned) if piece.axis is Axis.ROWS else (owned, self.hidden_size)
        return shapes

    def unit_params(self, role: Role) -> int:
        """Parameters one unit of ``role`` owns: its rows (with their bias entries) and columns of every slice.

        A column's bias entry is not the unit's: it is added whatever the unit's columns hold.
        """
        width = self.unit_width(role)
        return sum(
            width * (self.hidden_size + int(piece.axis is Axis.ROWS and piece.name in self.biased))
            for piece in self.layout.slices[role]
        )

    @property
    def kv_group_params(self) -> int:
        """Parameters of one KV group's K and V heads (its query heads are counted per slot)."""
        return self.unit_params(Role.KV_HEAD)

    @property
    def query_head_params(self) -> int:
        return self.unit_params(Role.QUERY_HEAD)

    @property
    def mlp_channel_params(self) -> int:
        return self.unit_params(Role.MLP_CHANNEL)

    @property
    def prunable_params(self) -> int:
        """Parameters that belong to some unit (column biases, norms, embeddings and the rest stay)."""
        per_layer = (
            self.num_kv_heads * self.kv_group_params
            + self.num_heads * self.query_head_params
            + self.intermediate_size * self.mlp_channel_params
        )
        return self.num_layers * per_layer

    def kept_params(self, masks: Masks) -> Tensor:
        """Prunable parameters that ``masks`` keeps; differentiable in the mask values."""
        total = torch.zeros(())
        for layer in range(self.num_layers):
            kv = masks[self.group(layer, UnitKind.KV_GROUP)]
            kept_queries = kv.sum() * self.kept_slots(masks, layer)
            mlp = masks[self.group(layer, UnitKind.MLP_CHANNEL)]
            total = (
                total
                + kv.sum() * self.kv_group_params
                + kept_queries * self.query_head_params
                + mlp.sum() * self.mlp_channel_params
            )
        return total

    def kept_fraction(self, masks: Masks) -> Tensor:
        """Fraction of prunable parameters kept (1 - sparsity); differentiable."""
        return self.kept_params(masks) / self.prunable_params

    def sparsity(self, masks: Masks) -> float:
        """Fraction of prunable parameters that ``masks`` removes."""
        return 1.0 - float(self.kept_fraction(masks).detach())

    def part_sparsity(self, masks: Masks, kinds: Collection[UnitKind]) -> float:
        """Fraction removed of the parameters that units of ``kinds`` own (the attention's, or the MLP's
        channels). ``masks`` needs only those units' groups: the other units count as kept."""
        device = next(iter(masks.values())).device
        kept = {g: torch.ones(g.size, device=device) for g in self.groups if g.kind not in kinds}
        part = {**kept, **{g: masks[g] for g in self.groups if g.kind in kinds}}
        none_kept = {**kept, **{g: torch.zeros(g.size, device=device) for g in self.groups if g.kind in kinds}}
        owned = self.prunable_params - float(self.kept_params(none_kept))
        return (self.prunable_params - float(self.kept_params(part))) / owned

    # -- per-layer views ---------------------------------------------------------------
    def kept_slots(self, masks: Masks, layer: int) -> Tensor:
        """Number of query slots kept per KV group in ``layer``."""
        slots = self.group(layer, UnitKind.QUERY_SLOT)
        return masks[slots].sum() if slots is not None else torch.ones(())

    def query_head_mask(self, masks: Masks, layer: int) -> Tensor:
        """Mask over the ``num_heads`` query heads of ``layer`` (group x slot grid, flattened)."""
        kv = masks[self.group(layer, UnitKind.KV_GROUP)]
        slots = self.group(layer, UnitKind.QUERY_SLOT)
        if slots is None:
            return kv
        return (kv[:, None] * masks[slots][None, :]).reshape(-1)

    def kv_head_mask(self, masks: Masks, layer: int) -> Tensor:
        return masks[self.group(layer, UnitKind.KV_GROUP)]

    def mlp_mask(self, masks: Masks, layer: int) -> Tensor:
        return masks[self.group(layer, UnitKind.MLP_CHANNEL)]

    # -- serialisation ------------------------------------------------------------------
    def masks_to_dict(self, masks: Masks) -> dict[str, list[int]]:
        """A JSON-ready form of a hard mask: ``{group.name: [0/1, ...]}``."""
        return {g.name: [int(v) for v in masks[g].round().tolist()] for g in self.groups}

    def masks_from_dict(self, data: Mapping[str, list[int]]) -> dict[UnitGroup, Tensor]:
        """Inverse of :meth:`masks_to_dict`; checks every group is present with its size."""
        masks = {}
        for g in self.groups:
            values = data.get(g.name)
            if values is None or len(values) != g.size:
                got = "missing" if values is None else f"{len(values)} values"
                raise ValueError(f"mask for {g.name}: expected {g.size} values, got {got}")
            masks[g] = torch.tensor(values, dtype=torch.float32)
        return masks

    def full_masks(self) -> dict[UnitGroup, Tensor]:
        """The mask that keeps every unit."""
        return {g: torch.ones(g.size) for g in self.groups}
