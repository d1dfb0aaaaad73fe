"""atp-ray: All-in-One Tuning and structural Pruning of decoder LLMs, searched on Ray."""

from __future__ import annotations

from typing import Any

__all__ = ["load_compressed"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing atp_ray (e.g. for the CLI's --help) does not import transformers.
    if name == "load_compressed":
        from atp_ray.compression.compress import load_compressed

        return load_compressed
    raise AttributeError(f"module 'atp_ray' has no attribute {name!r}")
