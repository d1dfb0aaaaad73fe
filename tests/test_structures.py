import pytest
import torch
from conftest import TINY_MODELS, make_tiny_model, random_masks
from transformers import GPT2Config

from atp_ray.errors import UnsupportedArchitectureError
from atp_ray.models import decoder_layers
from atp_ray.pruning.structures import ATTENTION_KINDS, PruningSpace, UnitKind


def _prunable_param_count(model) -> int:
    """Counted from the real modules: every q/k/v/o/gate/up/down parameter except o/down biases."""
    total = 0
    for layer in decoder_layers(model):
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
            total += sum(p.numel() for p in proj.parameters())
        total += layer.self_attn.o_proj.weight.numel() + layer.mlp.down_proj.weight.numel()
    return total


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_prunable_params_match_the_modules(name):
    model = make_tiny_model(name)
    space = PruningSpace.from_config(model.config)
    assert space.prunable_params == _prunable_param_count(model)
    assert float(space.kept_fraction(space.full_masks())) == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_units_follow_gqa(name):
    config = make_tiny_model(name).config
    space = PruningSpace.from_config(config)
    per_group = config.num_attention_heads // config.num_key_value_heads
    for layer in range(config.num_hidden_layers):
        assert space.group(layer, UnitKind.KV_GROUP).size == config.num_key_value_heads
        assert space.group(layer, UnitKind.MLP_CHANNEL).size == config.intermediate_size
        slots = space.group(layer, UnitKind.QUERY_SLOT)
        assert (slots is None) == (per_group == 1)
        if slots is not None:
            assert slots.size == per_group


def test_kept_params_counts_each_kept_head_and_channel():
    space = PruningSpace.from_config(make_tiny_model("qwen2-gqa").config)  # 2 KV groups x 3 slots, q/k/v bias
    masks = space.full_masks()
    layer0 = {g.kind: g for g in space.groups if g.layer == 0}
    masks[layer0[UnitKind.KV_GROUP]] = torch.tensor([1.0, 0.0])  # group 1 goes: its KV head and 3 query heads
    masks[layer0[UnitKind.QUERY_SLOT]] = torch.tensor([1.0, 1.0, 0.0])  # slot 2 of the kept group goes
    masks[layer0[UnitKind.MLP_CHANNEL]][:10] = 0.0
    hidden, head = 48, 8
    kv, query, channel = 2 * head * (hidden + 1), head * (hidden + 1) + head * hidden, 3 * hidden
    removed = kv + 4 * query + 10 * channel
    assert int(space.kept_params(masks)) == space.prunable_params - removed
    assert space.query_head_mask(masks, 0).tolist() == [1, 1, 0, 0, 0, 0]
    # Each part's own share: the attention's of its 2 layers x (2 KV + 6 query heads), the MLP's of its channels.
    attention_params, mlp_params = 2 * (2 * kv + 6 * query), 2 * space.intermediate_size * channel
    assert space.part_sparsity(masks, ATTENTION_KINDS) == pytest.approx((kv + 4 * query) / attention_params)
    assert space.part_sparsity(masks, (UnitKind.MLP_CHANNEL,)) == pytest.approx(10 * channel / mlp_params)


def test_kept_fraction_is_differentiable():
    space = PruningSpace.from_config(make_tiny_model("llama-gqa").config)
    masks = {g: m.requires_grad_() for g, m in random_masks(space).items()}
    space.kept_fraction(masks).backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks.values())


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        PruningSpace.from_config(GPT2Config())


def test_mask_round_trip_through_dict():
    space = PruningSpace.from_config(make_tiny_model("mistral-gqa").config)
    masks = random_masks(space, seed=3)
    again = space.masks_from_dict(space.masks_to_dict(masks))
    assert all(torch.equal(masks[g], again[g]) for g in space.groups)
    with pytest.raises(ValueError, match="layers.0.kv_group"):
        space.masks_from_dict({})
