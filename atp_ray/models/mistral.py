"""Mistral: Llama's layout, no biases."""

from __future__ import annotations

from atp_ray.models.base import ModelFamily
from atp_ray.models.llama import LLAMA_LAYOUT

MISTRAL = ModelFamily("mistral", LLAMA_LAYOUT, lambda config: frozenset())
