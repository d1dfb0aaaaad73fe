"""A fixed teacher's top-k next-token logits, computed once and read back by every run that distils from it.

The ``dense`` and ``tuned`` distillation teachers do not change while a student trains, and a
run's training blocks are fixed by its data config and seed. So their top-k logits on those
blocks can be computed once (``atp-ray distill-cache``) and shared by every run of a search
that trains on the same blocks: the student's step then runs no teacher forward at all.

The cache is one safetensors file: per training block, keyed by the sha256 of its token ids
(so any batch size, rank layout or order finds its rows), ``<key>.values`` (fp32 logits) and
``<key>.indices`` (int32 token ids), ``[seq, k]`` each; its metadata names the teacher, the
model and ``k``, checked against the run that reads it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from atp_ray.config import RunConfig
from atp_ray.data.batches import BatchStream, TokenBlocks
from atp_ray.errors import ConfigError
from atp_ray.training.distillation import TopLogits, teacher_logits, top_logits

__all__ = ["TeacherCache", "block_key", "drawn_blocks", "write_teacher_cache"]


def block_key(input_ids: Tensor) -> str:
    """The cache key of one training block: the sha256 of its token ids as int64."""
    return hashlib.sha256(input_ids.to(device="cpu", dtype=torch.int64).numpy().tobytes()).hexdigest()


def _identity(config: RunConfig) -> dict[str, str]:
    """What a cache must agree on with the run that reads it (safetensors metadata is str -> str)."""
    distill = config.distill
    return {
        "model": config.model.path,
        "teacher": distill.teacher,
        "teacher_run": distill.teacher_run or "",
        "top_k": str(distill.top_k),
    }


def drawn_blocks(config: RunConfig, train: TokenBlocks) -> dict[str, Tensor]:
    """Every training block ``config``'s run draws, on every rank, each once, as one batch ``[n, seq]``."""
    world = config.distributed.workers or 1
    micro_batches = config.train.steps * config.distributed.gradient_accumulation_steps
    rows: dict[str, dict[str, Tensor]] = {}
    for rank in range(world):
        stream = BatchStream(train, config.train.batch_size, config.train.seed, rank, world)
        for index in range(micro_batches):
            batch = stream.batch(index)
            for row in range(len(batch["input_ids"])):
                rows.setdefault(block_key(batch["input_ids"][row]), {k: v[row] for k, v in batch.items()})
    return {name: torch.stack([row[name] for row in rows.values()]) for name in next(iter(rows.values()))}


def write_teacher_cache(
    config: RunConfig,
    model: torch.nn.Module,
    blocks: dict[str, Tensor],
    path: Path,
    batch_size: int,
    progress: bool = True,
) -> int:
    """Run ``config``'s teacher over ``blocks`` and write their top-k logits to ``path``; returns the count.

    ``model`` is the peft model a run builds (with the tuned teacher's adapter attached for
    ``teacher=tuned``), on the device the forward should run on; call it under the run's
    autocast. Written to a temporary file and renamed: a killed build leaves no half cache.
    """
    device = next(model.parameters()).device
    tensors: dict[str, Tensor] = {}
    for start in tqdm(range(0, len(blocks["input_ids"]), batch_size), desc="teacher cache", disable=not progress):
        batch = {name: rows[start : start + batch_size].to(device) for name, rows in blocks.items()}
        top = top_logits(teacher_logits(model, batch, config.distill.teacher), config.distill.top_k)
        for row, values, indices in zip(batch["input_ids"], top.values, top.indices):
            key = block_key(row)
            tensors[f"{key}.values"] = values.cpu().contiguous()
            tensors[f"{key}.indices"] = indices.to(dtype=torch.int32, device="cpu").contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=_identity(config))
    os.replace(partial, path)
    return len(tensors) // 2


class TeacherCache:
    """Read a cache written by :func:`write_teacher_cache`, checked against the reading run's config."""

    def __init__(self, path: Path, config: RunConfig):
        if not path.is_file():
            raise ConfigError([f"distill.cache {path}: no such file; build it with `atp-ray distill-cache`"])
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        self._keys = set(self._file.keys())
        built, wanted = self._file.metadata() or {}, _identity(config)
        differs = {k: (built.get(k), v) for k, v in wanted.items() if built.get(k) != v}
        if differs:
            found = ", ".join(f"{k} {b!r} (this run: {w!r})" for k, (b, w) in differs.items())
            raise ConfigError([f"distill.cache {path} was built for another teacher: {found}; build it again"])

    def top_logits(self, input_ids: Tensor) -> TopLogits:
        """The cached top logits of the blocks in ``input_ids`` ``[batch, seq]``, on its device."""
        keys = [block_key(row) for row in input_ids.cpu()]  # one copy to the host per batch, not one per row
        missing = [k for k in keys if f"{k}.values" not in self._keys]
        if missing:
            raise ConfigError([
                f"distill.cache {self.path} lacks {len(missing)} of this batch's {len(keys)} blocks: it was built "
                "for other data, seed, steps or batch size; build it again with this run's config"
            ])
        values = torch.stack([self._file.get_tensor(f"{k}.values") for k in keys])
        indices = torch.stack([self._file.get_tensor(f"{k}.indices") for k in keys])
        return TopLogits(values.to(input_ids.device), indices.to(input_ids.device))
