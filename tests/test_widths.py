"""Rounding a hard mask's kept MLP widths to a multiple: aligned counts, total kept, best channels."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, random_masks

from atp_ray.pruning.structures import PruningSpace, UnitKind
from atp_ray.pruning.widths import round_mlp_channels, rounded_counts


def test_counts_become_multiples_and_keep_the_total():
    counts, sizes = [13, 30, 7, 48, 25], [48] * 5
    rounded = rounded_counts(counts, 8, sizes)
    # Remainders 5, 6, 7, -, 1 over floors 8, 24, 0, 48, 24: two blocks go up, to the largest remainders.
    assert rounded == [8, 32, 8, 48, 24]
    assert rounded[3] == 48  # a whole layer stays whole
    assert all(r % 8 == 0 for r, c in zip(rounded, counts) if c != 48)
    assert all(abs(r - c) < 8 for r, c in zip(rounded, counts))
    assert abs(sum(rounded) - sum(counts)) <= 4
    assert rounded_counts(counts, 1, sizes) == counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rounded_mask_moves_only_the_edge_channels(seed):
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    masks = random_masks(space, seed=seed, keep=0.5)
    scores = {g: torch.randn(g.size, generator=torch.Generator().manual_seed(g.layer)) for g in space.groups}
    rounded = round_mlp_channels(space, masks, 8, scores)
    for layer in range(space.num_layers):
        group = space.group(layer, UnitKind.MLP_CHANNEL)
        before, after, score = masks[group], rounded[group], scores[group]
        assert after.sum() % 8 == 0
        if after.sum() <= before.sum():  # dropped the kept channels that score lowest
            assert (after <= before).all()
            dropped = (before == 1) & (after == 0)
            if dropped.any():
                assert score[dropped].max() <= score[after == 1].min()
        else:  # added the cut channels that score highest
            assert (after >= before).all()
            added = (before == 0) & (after == 1)
            assert score[added].min() >= score[(before == 0) & (after == 0)].max()
    assert all(torch.equal(rounded[g], masks[g]) for g in space.groups if g.kind != UnitKind.MLP_CHANNEL)
    assert abs(space.sparsity(rounded) - space.sparsity(masks)) <= 8 * space.mlp_channel_params / space.prunable_params


def test_multiple_one_changes_nothing():
    space = PruningSpace.from_config(make_tiny_model("qwen2-gqa").config)
    masks = random_masks(space)
    rounded = round_mlp_channels(space, masks, 1, {g: torch.zeros(g.size) for g in space.groups})
    assert all(torch.equal(rounded[g], masks[g]) for g in space.groups)
