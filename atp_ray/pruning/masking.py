"""Applying unit masks to a live decoder, reversibly.

A masked query head or MLP channel must contribute nothing, exactly as if it were cut.
We multiply the *input* of the projection that writes a unit's output to the residual
stream (o_proj per query head, down_proj per channel; see ``DecoderLayout.output``): that
zeroes everything the unit writes to the residual stream, including its LoRA path when
the projection is a peft LoRA layer, since the hook sits on the module the layer calls.
A KV head only feeds the query heads of its group, so masking those heads masks it too.
Hooks live only inside the ``masked`` context: the mask is an argument of each step,
never state left on the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from atp_ray.models.layout import Role
from atp_ray.pruning.structures import Masks, PruningSpace


def _scale_input(mask: Tensor):
    def hook(_module: nn.Module, args: tuple[Any, ...]):
        (x, *rest) = args
        return (x * mask.to(x.dtype), *rest)

    return hook


@contextmanager
def masked(model: nn.Module, space: PruningSpace, masks: Masks) -> Iterator[nn.Module]:
    """Run ``model`` with ``masks`` applied; gradients flow into the mask values."""
    handles = []
    heads_out, channels_out = space.layout.output(Role.QUERY_HEAD), space.layout.output(Role.MLP_CHANNEL)
    try:
        for index, layer in enumerate(space.layout.layers(model)):
            heads = space.query_head_mask(masks, index).repeat_interleave(space.head_dim)
            handles.append(heads_out.module(layer).register_forward_pre_hook(_scale_input(heads)))
            channels = space.mlp_mask(masks, index)
            handles.append(channels_out.module(layer).register_forward_pre_hook(_scale_input(channels)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
