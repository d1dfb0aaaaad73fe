"""Llama: the decoder layout Mistral and Qwen2 share; biases where the config asks for them."""

from __future__ import annotations

from typing import Any

from atp_ray.models.base import ModelFamily
from atp_ray.models.layout import Axis, DecoderLayout, Role, Slice

LLAMA_LAYOUT = DecoderLayout(
    layers_path="model.layers",
    attention_path="self_attn",
    slices={
        Role.QUERY_HEAD: (Slice("self_attn.q_proj", Axis.ROWS), Slice("self_attn.o_proj", Axis.COLUMNS)),
        Role.KV_HEAD: (Slice("self_attn.k_proj", Axis.ROWS), Slice("self_attn.v_proj", Axis.ROWS)),
        Role.MLP_CHANNEL: (
            Slice("mlp.gate_proj", Axis.ROWS),
            Slice("mlp.up_proj", Axis.ROWS),
            Slice("mlp.down_proj", Axis.COLUMNS),
        ),
    },
)

ATTENTION_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
MLP_PROJECTIONS = frozenset({"gate_proj", "up_proj", "down_proj"})


def _biased(config: Any) -> frozenset[str]:
    # LlamaConfig switches attention and MLP biases separately (both off in Llama's own checkpoints).
    return (ATTENTION_PROJECTIONS if config.attention_bias else frozenset()) | (
        MLP_PROJECTIONS if config.mlp_bias else frozenset()
    )


LLAMA = ModelFamily("llama", LLAMA_LAYOUT, _biased)
