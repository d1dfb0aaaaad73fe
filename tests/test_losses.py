import math

import pytest
import torch
from conftest import make_tiny_model, random_masks
from peft import LoraConfig, get_peft_model

from atp_ray.models import DEFAULT_LORA_TARGETS, decoder_layers
from atp_ray.pruning.losses import lora_group_lasso, ratio_loss
from atp_ray.pruning.structures import PruningSpace, UnitKind


def test_ratio_loss_is_log_ratio_and_symmetric():
    assert float(ratio_loss(torch.tensor(0.6), 0.6)) == pytest.approx(0.0)
    assert float(ratio_loss(torch.tensor(0.3), 0.6)) == pytest.approx(math.log(2))
    assert float(ratio_loss(torch.tensor(0.6), 0.3)) == pytest.approx(math.log(2))


def _lora_model(name):
    model = make_tiny_model(name)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=DEFAULT_LORA_TARGETS))
    for module in peft_model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    return peft_model, PruningSpace.from_config(model.config)


def _owned_mask(space, masks, layer_index):
    """Per projection, True on the LoRA rows/columns that belong to some removed unit."""
    heads = space.query_head_mask(masks, layer_index) == 0
    kv = space.kv_head_mask(masks, layer_index) == 0
    channels = space.mlp_mask(masks, layer_index) == 0
    rows = lambda units, dim: units.repeat_interleave(dim)  # noqa: E731
    return {
        ("q_proj", "lora_B"): rows(heads, space.head_dim)[:, None],
        ("k_proj", "lora_B"): rows(kv, space.head_dim)[:, None],
        ("v_proj", "lora_B"): rows(kv, space.head_dim)[:, None],
        ("o_proj", "lora_A"): rows(heads, space.head_dim)[None, :],
        ("gate_proj", "lora_B"): channels[:, None],
        ("up_proj", "lora_B"): channels[:, None],
        ("down_proj", "lora_A"): channels[None, :],
    }


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-mha", "mistral-gqa"])
def test_group_lasso_touches_only_removed_units(name):
    model, space = _lora_model(name)
    masks = random_masks(space, seed=1, keep=0.5)
    lora_group_lasso(model, space, masks).backward()
    for index, layer in enumerate(decoder_layers(model)):
        modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
        for (proj, which), owned in _owned_mask(space, masks, index).items():
            for side in ("lora_A", "lora_B"):
                grad = getattr(modules[proj], side)["default"].weight.grad
                if side != which:
                    assert grad is None or grad.abs().sum() == 0, (proj, side)
                    continue
                owned_full = owned.expand_as(grad)
                assert grad[~owned_full].abs().sum() == 0, (proj, side)
                if owned.any():
                    assert grad[owned_full].abs().sum() > 0, (proj, side)


def test_group_lasso_is_zero_when_nothing_is_removed():
    model, space = _lora_model("llama-gqa")
    assert lora_group_lasso(model, space, space.full_masks()).item() == pytest.approx(0.0)


def test_group_lasso_value_is_the_sum_of_group_norms():
    model, space = _lora_model("qwen2-mha")  # no GQA: units are heads and channels
    masks = space.full_masks()
    masks[space.groups[0]] = torch.tensor([0.0, 1.0, 1.0, 1.0])  # layer 0, head 0
    attn = decoder_layers(model)[0].self_attn
    dim = space.head_dim
    parts = [
        attn.q_proj.lora_B["default"].weight[:dim],
        attn.k_proj.lora_B["default"].weight[:dim],
        attn.v_proj.lora_B["default"].weight[:dim],
        attn.o_proj.lora_A["default"].weight[:, :dim],
    ]
    expected = math.sqrt(sum(float(p.pow(2).sum()) for p in parts))
    assert float(lora_group_lasso(model, space, masks)) == pytest.approx(expected, rel=1e-5)


def _head_rows(weight, heads, dim, columns=False):
    """The rows (or columns) of a projection that belong to the given query heads."""
    index = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in heads])
    return weight[:, index] if columns else weight[index]


@pytest.mark.parametrize(
    "kind, unit, heads, kv",
    [
        (UnitKind.QUERY_SLOT, 1, [1, 3], False),  # slot 1 of both KV groups: query heads 1 and 3
        (UnitKind.KV_GROUP, 1, [2, 3], True),  # KV group 1: its K/V head and query heads 2 and 3
    ],
)
def test_group_lasso_value_under_gqa(kind, unit, heads, kv):
    """GQA (4 query heads, 2 KV heads): query head h = group * 2 + slot, the order repeat_kv uses."""
    model, space = _lora_model("llama-gqa")
    assert (space.num_heads, space.num_kv_heads) == (4, 2)
    masks = space.full_masks()
    masks[space.group(0, kind)][unit] = 0.0
    attn = decoder_layers(model)[0].self_attn
    dim = space.head_dim
    parts = [
        _head_rows(attn.q_proj.lora_B["default"].weight, heads, dim),
        _head_rows(attn.o_proj.lora_A["default"].weight, heads, dim, columns=True),
    ]
    if kv:
        parts += [_head_rows(attn.k_proj.lora_B["default"].weight, [unit], dim)]
        parts += [_head_rows(attn.v_proj.lora_B["default"].weight, [unit], dim)]
    expected = math.sqrt(sum(float(p.pow(2).sum()) for p in parts))
    assert float(lora_group_lasso(model, space, masks)) == pytest.approx(expected, rel=1e-5)
