"""Where a decoder layer keeps each unit's weights: the one place that names projections.

Every prunable unit owns a block of consecutive *rows* (output features) of some
projections and a block of consecutive *columns* (input features) of others:

- a query head: ``head_dim`` rows of q_proj and ``head_dim`` columns of o_proj;
- a KV head: ``head_dim`` rows of k_proj and of v_proj;
- an MLP channel: one row of gate_proj and of up_proj, one column of down_proj.

The unit groups of :mod:`atp_ray.pruning.structures` are built from these (a KV group is its KV
head plus its query heads; a query slot is one query head in every group). Masking, the
LoRA group lasso, importance scoring and surgery all address weights through
:class:`DecoderLayout` so that none of them spells a projection name. Each supported
family names its layout in :mod:`atp_ray.models`. Whatever side of a projection a unit
owns, the other side is the residual stream (``hidden_size`` wide).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Axis(str, enum.Enum):
    """Which side of a projection a unit owns."""

    ROWS = "rows"  # output features: weight[out, :], bias[out]
    COLUMNS = "columns"  # input features: weight[:, in]


class Role(str, enum.Enum):
    """The smallest piece of a layer that owns weights of its own."""

    QUERY_HEAD = "query_head"
    KV_HEAD = "kv_head"
    MLP_CHANNEL = "mlp_channel"


@dataclass(frozen=True)
class Slice:
    """One projection of a decoder layer and the side of it a unit owns."""

    path: str  # module path inside a decoder layer, e.g. "self_attn.q_proj"
    axis: Axis

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.path)

    def replace(self, layer: nn.Module, new: nn.Module) -> None:
        """Put ``new`` where this projection is in ``layer``."""
        parent, _, name = self.path.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, new)


# What one tensor of a projection contributes to a score: a non-negative tensor laid out
# like the projection (rows along dim 0, columns along the last dim), or None to skip it.
Values = Callable[[nn.Module, Axis], Tensor | None]


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, tied ones counted once (parameters() yields a tied tensor once)."""
    return sum(p.numel() for p in model.parameters())


def unit_sums(values: Tensor, axis: Axis, units: int) -> Tensor:
    """Sum of ``values`` over each of ``units`` equal consecutive blocks along ``axis``.

    ``values`` is a weight-shaped tensor (or a LoRA factor: lora_B ``[out, r]`` for rows,
    lora_A ``[r, in]`` for columns).
    """
    if axis is Axis.ROWS:
        return values.reshape(units, -1).sum(1)
    return values.sum(0).reshape(units, -1).sum(1)


@dataclass(frozen=True)
class DecoderLayout:
    """Module names of a decoder family: where its layers are and which slices each role owns."""

    layers_path: str  # the decoder layers inside the causal LM, e.g. "model.layers"
    attention_path: str  # the attention module inside a decoder layer, e.g. "self_attn"
    slices: Mapping[Role, tuple[Slice, ...]]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a causal LM, a peft-wrapped one included."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.get_submodule(self.layers_path)

    @property
    def projections(self) -> tuple[str, ...]:
        """Names of every projection some unit owns part of, in slice order."""
        return tuple(dict.fromkeys(piece.name for pieces in self.slices.values() for piece in pieces))

    def output(self, role: Role) -> Slice:
        """The projection whose input columns carry this role's output into the residual stream."""
        (column,) = [s for s in self.slices[role] if s.axis is Axis.COLUMNS]
        return column

    def role_sums(self, layer: nn.Module, role: Role, units: int, values: Values) -> Tensor | None:
        """Per-unit sum of ``values`` over every slice ``role`` owns in ``layer`` (None: nothing counted)."""
        parts = []
        for piece in self.slices[role]:
            tensor = values(piece.module(layer), piece.axis)
            if tensor is not None:
                parts.append(unit_sums(tensor, piece.axis, units))
        return torch.stack(parts).sum(0) if parts else None
