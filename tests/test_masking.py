import torch
from conftest import random_masks
from peft import LoraConfig, get_peft_model

from atp_ray.models import DEFAULT_LORA_TARGETS, decoder_layers
from atp_ray.pruning.masking import masked
from atp_ray.pruning.structures import PruningSpace


def _zero_cut_units(model, space, masks):
    """Cut units by hand: zero the o_proj columns of removed heads and down_proj columns of removed channels."""
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(model)):
            heads = space.query_head_mask(masks, index).repeat_interleave(space.head_dim)
            layer.self_attn.o_proj.weight[:, heads == 0] = 0
            layer.mlp.down_proj.weight[:, space.mlp_mask(masks, index) == 0] = 0


def test_masked_units_contribute_nothing(tiny_model):
    space = PruningSpace.from_config(tiny_model.config)
    masks = random_masks(space, keep=0.5)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    with masked(tiny_model, space, masks):
        masked_logits = tiny_model(ids).logits
    _zero_cut_units(tiny_model, space, masks)
    assert torch.allclose(masked_logits, tiny_model(ids).logits, atol=1e-5)


def test_masking_is_removed_on_exit(tiny_model):
    space = PruningSpace.from_config(tiny_model.config)
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 8))
    before = tiny_model(ids).logits
    with masked(tiny_model, space, random_masks(space, keep=0.3)):
        assert not torch.allclose(tiny_model(ids).logits, before)
    assert torch.equal(tiny_model(ids).logits, before)


def test_masking_covers_the_lora_path(tiny_model):
    """A cut head's LoRA update of o_proj must not leak through: masking sits on the LoRA layer."""
    space = PruningSpace.from_config(tiny_model.config)
    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=DEFAULT_LORA_TARGETS, lora_dropout=0.0))
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    masks = random_masks(space, keep=0.5)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 10))
    with masked(model, space, masks):
        masked_logits = model(ids).logits
    merged = model.merge_and_unload()
    _zero_cut_units(merged, space, masks)
    assert torch.allclose(masked_logits, merged(ids).logits, atol=1e-4)


def test_gradients_reach_the_mask(tiny_model):
    space = PruningSpace.from_config(tiny_model.config)
    masks = {g: m.requires_grad_() for g, m in random_masks(space).items()}
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 8))
    with masked(tiny_model, space, masks):
        tiny_model(ids, labels=ids).loss.backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks.values())
