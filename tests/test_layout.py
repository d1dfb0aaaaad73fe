"""The decoder layout: the one table that says which rows and columns each unit owns."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, make_tiny_model

from atp_ray.compression import compress
from atp_ray.evaluation import targets
from atp_ray.models import DEFAULT_LORA_TARGETS, MODEL_FAMILIES, decoder_layers
from atp_ray.models.layout import Axis, Role, count_params, unit_sums
from atp_ray.pruning.structures import PruningSpace


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_slice_splits_into_its_units(name):
    model = make_tiny_model(name)
    space = PruningSpace.from_config(model.config)
    units = {Role.QUERY_HEAD: space.num_heads, Role.KV_HEAD: space.num_kv_heads, Role.MLP_CHANNEL: space.intermediate_size}
    block = {Role.QUERY_HEAD: space.head_dim, Role.KV_HEAD: space.head_dim, Role.MLP_CHANNEL: 1}
    layer = decoder_layers(model)[0]
    for role, pieces in space.layout.slices.items():
        for piece in pieces:
            weight = piece.module(layer).weight
            width = weight.shape[0] if piece.axis is Axis.ROWS else weight.shape[1]
            assert width == units[role] * block[role], (role, piece.path)
            assert weight.shape[1 - (piece.axis is Axis.COLUMNS)] == space.hidden_size


@pytest.mark.parametrize("model_type", sorted(MODEL_FAMILIES))
def test_layout_names_every_lora_target_once(model_type):
    layout = MODEL_FAMILIES[model_type].layout
    paths = [p.path for pieces in layout.slices.values() for p in pieces]
    assert len(paths) == len(set(paths))
    assert set(layout.projections) <= set(DEFAULT_LORA_TARGETS)


def test_unit_sums_follow_the_axis():
    values = torch.arange(24.0).reshape(4, 6)  # 4 rows, 6 columns
    assert unit_sums(values, Axis.ROWS, 2).tolist() == [values[:2].sum().item(), values[2:].sum().item()]
    assert unit_sums(values, Axis.COLUMNS, 3).tolist() == [values[:, i : i + 2].sum().item() for i in (0, 2, 4)]


def test_role_sums_match_hand_written_slices():
    model = make_tiny_model("qwen2-gqa")
    space = PruningSpace.from_config(model.config)
    layer = decoder_layers(model)[1]
    squares = space.layout.role_sums(layer, Role.MLP_CHANNEL, space.intermediate_size, lambda m, _a: m.weight.pow(2))
    expected = (
        layer.mlp.gate_proj.weight.pow(2).sum(1) + layer.mlp.up_proj.weight.pow(2).sum(1) + layer.mlp.down_proj.weight.pow(2).sum(0)
    )
    torch.testing.assert_close(squares, expected)
    heads = space.layout.role_sums(layer, Role.QUERY_HEAD, space.num_heads, lambda m, _a: m.weight.pow(2))
    d = space.head_dim
    torch.testing.assert_close(
        heads[1], layer.self_attn.q_proj.weight[d : 2 * d].pow(2).sum() + layer.self_attn.o_proj.weight[:, d : 2 * d].pow(2).sum()
    )
    assert space.layout.role_sums(layer, Role.KV_HEAD, space.num_kv_heads, lambda m, _a: None) is None


def test_one_parameter_count():
    assert compress.count_params is count_params and targets.count_params is count_params
