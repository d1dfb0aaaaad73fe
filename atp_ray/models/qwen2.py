"""Qwen2: Llama's layout, with biases on the query, key and value projections only."""

from __future__ import annotations

from atp_ray.models.base import ModelFamily
from atp_ray.models.llama import LLAMA_LAYOUT

QWEN2 = ModelFamily("qwen2", LLAMA_LAYOUT, lambda config: frozenset({"q_proj", "k_proj", "v_proj"}))
