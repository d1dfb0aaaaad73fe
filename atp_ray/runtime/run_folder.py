"""The layout of a run folder and the atomic writes that keep it consistent after a crash.

    config.yaml           the resolved run config
    metrics.jsonl         one row per logged step
    checkpoint.pt         latest resumable training state (tensors only: weights_only loads)
    mask.json             the final, noise-free hard mask and its sparsity (an elastic run: one per budget)
    adapter/              the LoRA adapter in peft format
    generator.safetensors the generator's weights
    summary.json          written last: its presence means the run finished
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from atp_ray.errors import RunFolderError
from atp_ray.pruning.structures import PruningSpace, UnitGroup


def budget_key(sparsity: float) -> str:
    """How a sparsity budget is named in files and metrics: "0.2", "0.35"."""
    return f"{round(sparsity, 4):g}"


# How far a single run's achieved sparsity may be from a budget asked of it (one MLP channel is
# far below this on any supported model; a frozen mask hits its budget to one unit).
BUDGET_MATCH = 0.01


def _mask_json(space: PruningSpace, masks: dict[UnitGroup, torch.Tensor]) -> dict[str, Any]:
    return {"sparsity": space.sparsity(masks), "groups": space.masks_to_dict(masks)}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name beside ``path``, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run's files; their names are written here and nowhere else."""

    root: Path

    CONFIG: ClassVar[str] = "config.yaml"
    METRICS: ClassVar[str] = "metrics.jsonl"
    CHECKPOINT: ClassVar[str] = "checkpoint.pt"
    MASK: ClassVar[str] = "mask.json"
    ADAPTER: ClassVar[str] = "adapter"
    GENERATOR: ClassVar[str] = "generator.safetensors"
    SUMMARY: ClassVar[str] = "summary.json"
    # What a finished run hands on, the summary last (a distributed run's rank 0 writes them).
    OUTPUTS: ClassVar[tuple[str, ...]] = (CONFIG, METRICS, MASK, ADAPTER, GENERATOR, SUMMARY)

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def checkpoint(self) -> Path:
        return self.root / self.CHECKPOINT

    @property
    def mask(self) -> Path:
        return self.root / self.MASK

    @property
    def adapter(self) -> Path:
        return self.root / self.ADAPTER

    @property
    def generator(self) -> Path:
        return self.root / self.GENERATOR

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    def is_finished(self) -> bool:
        return self.summary.is_file()

    def has_trained(self) -> bool:
        """Whether training left state here that a rerun would resume: a checkpoint, logged metrics,
        or Ray Train storage (``ray/``, a distributed run's default)."""
        logged = self.metrics.is_file() and self.metrics.stat().st_size > 0
        return self.checkpoint.is_file() or logged or (self.root / "ray").exists()

    def check_can_run(self, resolved_config: dict[str, Any]) -> None:
        """Refuse a finished run, or an unfinished one of another config (RunFolderError).

        A folder whose run stopped before training (bad data, unreachable model) holds only
        its config: nothing to resume, so a corrected config may take its place.
        """
        if self.is_finished():
            raise RunFolderError(f"{self.root} holds a finished run; choose another --out")
        if self.config.is_file() and self.read_config() != resolved_config and not self._never_trained():
            raise RunFolderError(
                f"{self.root} holds a run with a different config; resume it with the same "
                f"config, or choose another --out (saved config: {self.config})"
            )

    def _never_trained(self) -> bool:
        # A distributed run with its own storage_path checkpoints elsewhere, out of sight: keep it.
        saved = self.read_config() or {}
        external = (saved.get("distributed") or {}).get("storage_path") is not None
        return not external and not self.has_trained()

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config.read_text())

    def write_mask(self, space: PruningSpace, masks: dict[UnitGroup, torch.Tensor]) -> None:
        atomic_write_json(self.mask, _mask_json(space, masks))

    def write_budget_masks(self, space: PruningSpace, masks: dict[float, dict[UnitGroup, torch.Tensor]]) -> None:
        """An elastic run's masks, one per sparsity budget."""
        budgets = {budget_key(b): _mask_json(space, m) for b, m in sorted(masks.items())}
        atomic_write_json(self.mask, {"budgets": budgets})

    def mask_budgets(self) -> list[float] | None:
        """The budgets of an elastic run's masks, ascending; None for a single run."""
        saved = json.loads(self.mask.read_text())
        return sorted(float(key) for key in saved["budgets"]) if "budgets" in saved else None

    def read_mask(self, space: PruningSpace, budget: float | None = None) -> dict[UnitGroup, torch.Tensor]:
        """The run's final mask; an elastic run's at ``budget`` (one of its budgets)."""
        saved = json.loads(self.mask.read_text())
        if "budgets" in saved:
            budgets = ", ".join(saved["budgets"])
            if budget is None:
                raise RunFolderError(f"{self.root} is an elastic run: choose one of its budgets ({budgets})")
            if budget_key(budget) not in saved["budgets"]:
                raise RunFolderError(f"{self.root} has no mask at sparsity {budget} (its budgets: {budgets})")
            saved = saved["budgets"][budget_key(budget)]
        elif budget is not None and abs(budget - saved["sparsity"]) > BUDGET_MATCH:
            raise RunFolderError(f"{self.root} holds one mask, at sparsity {saved['sparsity']:.4f}, not {budget}")
        return space.masks_from_dict(saved["groups"])

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        tmp = self.checkpoint.with_name(f".{self.checkpoint.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint.is_file():
            return None
        return torch.load(self.checkpoint, map_location="cpu", weights_only=True)
