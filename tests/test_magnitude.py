"""Uniform magnitude masks: exact sparsity, same shape in every layer, biggest units kept."""

from __future__ import annotations

import pytest
from conftest import TINY_MODELS, make_tiny_model
from transformers import LlamaConfig

from atp_ray.pruning.magnitude import attention_shape, layer_scores, uniform_magnitude_masks
from atp_ray.pruning.structures import PruningSpace, UnitKind


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("sparsity", [0.2, 0.4, 0.6])
def test_sparsity_hits_target_within_one_channel(name, sparsity):
    model = make_tiny_model(name)
    space = PruningSpace.from_config(model.config)
    masks = uniform_magnitude_masks(model, space, sparsity)
    assert abs(space.sparsity(masks) - sparsity) <= 0.5 * space.mlp_channel_params / space.prunable_params
    for kind in (UnitKind.KV_GROUP, UnitKind.QUERY_SLOT):
        kept = {masks[g].sum().item() for g in space.groups if g.kind == kind}
        assert len(kept) <= 1  # every layer has the same attention shape
    channels = [masks[space.group(i, UnitKind.MLP_CHANNEL)].sum().item() for i in range(space.num_layers)]
    assert max(channels) - min(channels) <= 1


@pytest.mark.parametrize("sparsity", [0.2, 0.4])
def test_aligned_channel_counts(sparsity):
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    masks = uniform_magnitude_masks(model, space, sparsity, channel_multiple=8)
    for layer in range(space.num_layers):
        assert masks[space.group(layer, UnitKind.MLP_CHANNEL)].sum() % 8 == 0
    assert abs(space.sparsity(masks) - sparsity) <= 4 * space.mlp_channel_params / space.prunable_params


def test_keeps_the_largest_units():
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    masks = uniform_magnitude_masks(model, space, 0.6)
    scores = layer_scores(model.model.layers[0], space)
    for kind in UnitKind:
        mask, score = masks[space.group(0, kind)], scores[kind]
        if (mask == 0).any():
            assert score[mask == 1].min() >= score[mask == 0].max()
    assert masks[space.group(0, UnitKind.MLP_CHANNEL)].sum() < space.intermediate_size


def test_attention_shape_prefers_more_query_heads_on_ties():
    # SmolLM2's grid (3 groups x 3 slots, no biases): one group owns as many parameters as one
    # query head, so 1 group x 3 slots and 2 groups x 1 slot both keep 4 of 12 parts.
    space = PruningSpace.from_config(LlamaConfig(hidden_size=36, num_attention_heads=9, num_key_value_heads=3))
    assert attention_shape(space, 4 / 12) == (1, 3)
    assert attention_shape(space, 1.0) == (3, 3)
    assert attention_shape(space, 0.0) == (1, 1)


def test_rejects_out_of_range_sparsity():
    model = make_tiny_model("llama-gqa")
    with pytest.raises(ValueError, match="sparsity"):
        uniform_magnitude_masks(model, PruningSpace.from_config(model.config), 1.0)
