"""Kept MLP widths the hardware likes: round a hard mask's channel counts to a multiple.

Matrix kernels run fastest on widths that are a multiple of their tile (8 on CPU, 64 or
128 on GPUs); a learned mask keeps any count per layer. :func:`round_mlp_channels` moves
each layer's count to a multiple while keeping the model's total channel count as close
to the original as the multiple allows (largest-remainder rounding), so the sparsity
moves by less than one multiple of channels in all. Which channels join or leave is
decided by a score (higher = keep), e.g. the generator's logits or magnitude; channels
the mask already keeps are preferred to any it cut. A layer that keeps every channel
stays whole (a dense layer needs no alignment).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from atp_ray.pruning.structures import Masks, PruningSpace, UnitGroup, UnitKind


def rounded_counts(counts: list[int], multiple: int, sizes: list[int]) -> list[int]:
    """Per-layer counts made multiples of ``multiple`` (or left at the full ``size``), total preserved best.

    Each count goes down or up to a neighbouring multiple; as many go up as keep the sum
    nearest the original, the ones with the largest remainders first (lower layer on ties).
    """
    fixed = [c == s for c, s in zip(counts, sizes)]
    floors = [c if full else (c // multiple) * multiple for c, full in zip(counts, fixed)]
    free = [i for i, full in enumerate(fixed) if not full and floors[i] + multiple <= sizes[i]]
    extra = round((sum(counts) - sum(floors)) / multiple)
    for i in sorted(free, key=lambda i: (-(counts[i] - floors[i]), i))[:extra]:
        floors[i] += multiple
    return floors


def _keep_best(mask: Tensor, score: Tensor, count: int) -> Tensor:
    """A mask of ``count`` units: those ``mask`` keeps first, each side ranked by ``score``."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(mask[order], descending=True, stable=True)]
    kept = torch.zeros_like(mask)
    kept[order[:count]] = 1.0
    return kept


def round_mlp_channels(
    space: PruningSpace, masks: Masks, multiple: int, scores: Mapping[UnitGroup, Tensor]
) -> dict[UnitGroup, Tensor]:
    """``masks`` with every layer's kept MLP channels a multiple of ``multiple`` (1: unchanged).

    ``masks`` must be hard; ``scores`` holds a score per MLP channel of each layer.
    """
    if multiple < 1:
        raise ValueError(f"mlp_channel_multiple must be >= 1, got {multiple}")
    rounded = dict(masks)
    if multiple == 1:
        return rounded
    groups = [space.group(layer, UnitKind.MLP_CHANNEL) for layer in range(space.num_layers)]
    counts = [int(masks[g].sum()) for g in groups]
    for group, count in zip(groups, rounded_counts(counts, multiple, [g.size for g in groups])):
        mask = masks[group]
        rounded[group] = _keep_best(mask, scores[group].detach().to(mask.device, torch.float32), count).to(mask.dtype)
    return rounded
