"""Tiny random decoders of every supported shape, built locally (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

# name -> (model class, config class, extra config); "gqa" variants share KV heads.
TINY_MODELS = {
    "llama-gqa": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mha-bias": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    ),
    "mistral-gqa": (MistralForCausalLM, MistralConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
    "qwen2-gqa": (Qwen2ForCausalLM, Qwen2Config, dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)),
    "qwen2-mha": (Qwen2ForCausalLM, Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=4)),
}


def make_tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised causal LM in fp32 eval mode."""
    model_cls, config_cls, extra = TINY_MODELS[name]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra})
    model = model_cls(config).eval()
    # Random init leaves biases at zero; perturb them so bias slicing is really tested.
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if name_.endswith("bias"):
                param.normal_(0, 0.1)
    return model


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request) -> torch.nn.Module:
    return make_tiny_model(request.param)


def random_masks(space, seed: int = 0, keep: float = 0.6):
    """A random hard mask that keeps at least one unit per group."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for group in space.groups:
        m = (torch.rand(group.size, generator=gen) < keep).float()
        m[torch.randint(group.size, (1,), generator=gen)] = 1.0
        masks[group] = m
    return masks
