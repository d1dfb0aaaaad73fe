"""Magnitude importance of prunable units, and uniform per-layer masks at an exact sparsity.

A unit's score is the L2 norm of every weight it owns (the rows and columns that
compression would remove with it), as in LLM-Pruner's magnitude criterion. The uniform
mask keeps the same attention shape in every layer (the KV-group x query-slot grid
whose kept share of attention parameters is closest to the target) and then solves for
the number of MLP channels that brings the whole model to the target sparsity, to within
one channel. Used for benchmarks and, with any importance score (atp_ray.pruning.importance),
as the two-step baseline's mask.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from atp_ray.models.layout import Axis, Role, Values
from atp_ray.pruning.structures import PruningSpace, UnitGroup, UnitKind


def _weight_squares(module: nn.Module, axis: Axis) -> Tensor:
    return module.weight.float().pow(2)


def unit_scores(layer: nn.Module, space: PruningSpace, values: Values) -> dict[UnitKind, Tensor]:
    """Square roots of per-unit sums of ``values`` over the weights each unit of one layer owns.

    (For magnitude that is each unit's L2 norm; for other criteria the root only rescales,
    since scores rank units within one kind of one layer.)

    ``values`` maps a projection to a non-negative weight-shaped tensor (squared weights for
    magnitude; see atp_ray.pruning.importance for others). A KV group sums its KV heads and all its
    query heads; a query slot sums that head in every group.
    """
    layout = space.layout
    query = layout.role_sums(layer, Role.QUERY_HEAD, space.num_heads, values)
    grid = query.reshape(space.num_kv_heads, space.queries_per_group)  # [group, slot]
    kv_own = layout.role_sums(layer, Role.KV_HEAD, space.num_kv_heads, values)
    channel = layout.role_sums(layer, Role.MLP_CHANNEL, space.intermediate_size, values)
    return {
        UnitKind.KV_GROUP: (kv_own + grid.sum(1)).sqrt(),
        UnitKind.QUERY_SLOT: grid.sum(0).sqrt(),
        UnitKind.MLP_CHANNEL: channel.sqrt(),
    }


@torch.no_grad()
def layer_scores(layer: nn.Module, space: PruningSpace) -> dict[UnitKind, Tensor]:
    """L2 norms of the weights each unit of one decoder layer owns (biases left out)."""
    return unit_scores(layer, space, _weight_squares)


def attention_shape(space: PruningSpace, keep: float) -> tuple[int, int]:
    """(KV groups, query slots) to keep per layer: kept share of attention params closest to ``keep``.

    Ties go to the shape with more query heads.
    """
    total = space.num_kv_heads * space.kv_group_params + space.num_heads * space.query_head_params

    def share(shape: tuple[int, int]) -> float:
        groups, slots = shape
        return (groups * space.kv_group_params + groups * slots * space.query_head_params) / total

    shapes = itertools.product(range(1, space.num_kv_heads + 1), range(1, space.queries_per_group + 1))
    return min(shapes, key=lambda s: (abs(share(s) - keep), -s[0] * s[1]))


def mlp_channels_per_layer(space: PruningSpace, keep: float, groups: int, slots: int, multiple: int = 1) -> list[int]:
    """MLP channels per layer that bring the model's kept fraction to ``keep``.

    Every layer keeps a multiple of ``multiple`` channels (at least one multiple): matrix
    kernels run faster on aligned widths, at the price of a coarser sparsity step.
    """
    attention = groups * space.kv_group_params + groups * slots * space.query_head_params
    budget = keep * space.prunable_params - space.num_layers * attention
    blocks = round(budget / (space.mlp_channel_params * multiple))
    blocks = min(max(blocks, space.num_layers), space.num_layers * (space.intermediate_size // multiple))
    base, extra = divmod(blocks, space.num_layers)
    return [(base + (layer < extra)) * multiple for layer in range(space.num_layers)]


def _top(scores: Tensor, count: int) -> Tensor:
    mask = torch.zeros_like(scores)
    mask[scores.topk(count).indices] = 1.0
    return mask


def uniform_masks(
    space: PruningSpace, scores: Sequence[Mapping[UnitKind, Tensor]], sparsity: float, channel_multiple: int = 1
) -> dict[UnitGroup, Tensor]:
    """A hard mask removing ``sparsity`` of the prunable parameters, lowest-scoring units first.

    ``scores[layer][kind]`` ranks the units of one kind in one layer (higher = keep); every
    layer keeps the same attention shape, and the sparsity is met to within
    ``channel_multiple`` MLP channels (see mlp_channels_per_layer).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    groups, slots = attention_shape(space, 1.0 - sparsity)
    channels = mlp_channels_per_layer(space, 1.0 - sparsity, groups, slots, channel_multiple)
    keep = {UnitKind.KV_GROUP: groups, UnitKind.QUERY_SLOT: slots}
    masks = {}
    for index, layer_scores_ in enumerate(scores):
        for kind, count in {**keep, UnitKind.MLP_CHANNEL: channels[index]}.items():
            group = space.group(index, kind)
            if group is not None:  # no query slots without GQA
                masks[group] = _top(layer_scores_[kind], count)
    return masks


def uniform_magnitude_masks(
    model: nn.Module, space: PruningSpace, sparsity: float, channel_multiple: int = 1
) -> dict[UnitGroup, Tensor]:
    """A hard mask removing ``sparsity`` of the prunable parameters, lowest-magnitude units first.

    The sparsity is met to within ``channel_multiple`` MLP channels (see mlp_channels_per_layer).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return uniform_masks(space, [layer_scores(layer, space) for layer in space.layout.layers(model)], sparsity, channel_multiple)
