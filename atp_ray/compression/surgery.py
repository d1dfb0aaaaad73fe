"""Shrinking one decoder layer in place to the attention heads and MLP channels it keeps.

Compression and loading share this code: compressing slices the kept units out of
trained weights; loading shrinks an uninitialised dense skeleton to the recorded widths
(keeping the first units) and then fills it from the saved file.

Heads are in the order ``repeat_kv`` reads them (query head ``g * q + s`` belongs to KV
head ``g``); kept query heads must come as ``kv_heads`` groups of equal size so that one
``num_key_value_groups`` per module still describes the layer. ``head_dim`` and
``scaling`` are never touched: RoPE tables and the softmax scale depend on them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from atp_ray.models import ModelFamily
from atp_ray.models.layout import Axis, DecoderLayout, Role


@dataclass(frozen=True)
class LayerWidths:
    """How many units one compressed decoder layer keeps."""

    kv_heads: int
    queries_per_group: int
    mlp_channels: int

    @property
    def query_heads(self) -> int:
        return self.kv_heads * self.queries_per_group


@dataclass(frozen=True)
class KeptUnits:
    """Indices of the units one layer keeps, in the source layer's numbering (ascending)."""

    kv_heads: Tensor
    query_heads: Tensor
    mlp_channels: Tensor

    @property
    def widths(self) -> LayerWidths:
        kv = len(self.kv_heads)
        return LayerWidths(kv, len(self.query_heads) // kv if kv else 0, len(self.mlp_channels))

    @classmethod
    def first(cls, widths: LayerWidths) -> KeptUnits:
        """The leading units of a dense layer: enough to give a skeleton the recorded shapes."""
        return cls(
            torch.arange(widths.kv_heads), torch.arange(widths.query_heads), torch.arange(widths.mlp_channels)
        )


class HeadlessAttention(nn.Module):
    """The attention of a layer that lost every head: it adds o_proj's bias (if any) and nothing else.

    It still appends zero-head keys and values to the KV cache so that the cache's length,
    which generate() reads from layer 0, stays in step with the other layers.
    """

    def __init__(self, o_proj: nn.Linear, layer_idx: int, head_dim: int):
        super().__init__()
        self.o_proj = o_proj  # in_features == 0: its output is its bias, or zeros
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: Tensor, cache: Any = None, **kwargs: Any) -> tuple[Tensor, None]:
        # transformers before the `cache` rename passes the cache as `past_key_values`.
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is not None:
            batch, seq = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 0, seq, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return self.o_proj(hidden_states[..., :0]), None


def _linear(weight: Tensor, bias: Tensor | None, requires_grad: bool) -> nn.Linear:
    # Built on the meta device so no memory is allocated or initialised before the real tensors go in.
    # A layer that lost every unit has zero-width Linears; torch warns that initialising them is a no-op.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=requires_grad)
    return layer


@torch.no_grad()
def take_rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """A Linear with only the output features ``rows`` (and their bias entries)."""
    bias = linear.bias.index_select(0, rows) if linear.bias is not None else None
    return _linear(linear.weight.index_select(0, rows), bias, linear.weight.requires_grad)


@torch.no_grad()
def take_columns(linear: nn.Linear, columns: Tensor) -> nn.Linear:
    """A Linear with only the input features ``columns``; its bias is unchanged."""
    bias = linear.bias.clone() if linear.bias is not None else None
    return _linear(linear.weight.index_select(1, columns), bias, linear.weight.requires_grad)


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Projection rows of the given heads, head after head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


_TAKE = {Axis.ROWS: take_rows, Axis.COLUMNS: take_columns}


def _shrink(layer: nn.Module, layout: DecoderLayout, role: Role, indices: Tensor) -> None:
    """Keep only the rows/columns ``indices`` of every projection ``role`` owns in ``layer``."""
    for piece in layout.slices[role]:
        piece.replace(layer, _TAKE[piece.axis](piece.module(layer), indices))


def shrink_attention(layer: nn.Module, kept: KeptUnits, family: ModelFamily) -> None:
    """Keep only ``kept``'s heads in ``layer``'s attention; a layer without heads becomes headless."""
    attn = family.attention(layer)
    q_rows = head_rows(kept.query_heads, attn.head_dim)
    if len(kept.query_heads) == 0:
        output = family.layout.output(Role.QUERY_HEAD)
        o_proj = take_columns(output.module(layer), q_rows)
        family.set_attention(layer, HeadlessAttention(o_proj, attn.layer_idx, attn.head_dim))
        return
    _shrink(layer, family.layout, Role.QUERY_HEAD, q_rows)
    _shrink(layer, family.layout, Role.KV_HEAD, head_rows(kept.kv_heads, attn.head_dim))
    family.set_queries_per_group(attn, kept.widths.queries_per_group)


def shrink_mlp(layer: nn.Module, kept: KeptUnits, family: ModelFamily) -> None:
    """Keep only ``kept``'s MLP channels; zero channels leave the output projection's bias (or zeros)."""
    _shrink(layer, family.layout, Role.MLP_CHANNEL, kept.mlp_channels)


def shrink_layer(layer: nn.Module, kept: KeptUnits, family: ModelFamily) -> None:
    """Shrink a decoder layer's attention and MLP to the units in ``kept``."""
    shrink_attention(layer, kept, family)
    shrink_mlp(layer, kept, family)
