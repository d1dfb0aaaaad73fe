"""The model-family registry: every family is what its tiny model really is, and nothing else is guessed."""

from __future__ import annotations

import pytest
from conftest import TINY_MODELS, make_tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from atp_ray.errors import UnsupportedArchitectureError
from atp_ray.models import DEFAULT_LORA_TARGETS, MODEL_FAMILIES, decoder_layers, family_of
from atp_ray.models.layout import Axis
from atp_ray.pruning.structures import PruningSpace


def test_every_family_has_a_tiny_model_in_the_tests():
    assert {TINY_MODELS[name][1].model_type for name in TINY_MODELS} == set(MODEL_FAMILIES)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_bias_rule_names_exactly_the_projections_with_a_bias(name):
    model = make_tiny_model(name)
    family = family_of(model.config.model_type)
    layer = decoder_layers(model)[0]
    with_bias = {
        piece.name for pieces in family.layout.slices.values() for piece in pieces if piece.module(layer).bias is not None
    }
    assert family.biased(model.config) == with_bias


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_projection_shapes_and_unit_params_come_from_the_slices(name):
    """(in, out) of every projection, and a unit's parameters: its rows with their biases, its columns."""
    model = make_tiny_model(name)
    space = PruningSpace.from_config(model.config)
    layer = decoder_layers(model)[0]
    for role, pieces in space.layout.slices.items():
        owned = 0
        for piece in pieces:
            module = piece.module(layer)
            assert space.projection_shapes()[piece.name] == (module.in_features, module.out_features)
            units = space.units(role)
            owned += module.weight.numel() // units
            if piece.axis is Axis.ROWS and module.bias is not None:
                owned += module.bias.numel() // units
        assert space.unit_params(role) == owned, role


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_default_lora_targets_cover_every_family(name):
    family = family_of(make_tiny_model(name).config.model_type)
    assert set(family.lora_targets) <= set(DEFAULT_LORA_TARGETS)


def test_an_unknown_family_is_an_error_not_a_guess():
    """A GPT-2 is not pruned, nor are its layers looked for under Llama's names."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*llama, mistral, qwen2"):
        decoder_layers(model)
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        family_of(model.config.model_type)
