"""Where a recipe runs: its device and, in a distributed run, how it agrees with its peers.

Plain ``torch.distributed``: a single process needs no process group, and the same
recipe runs unchanged on N workers once a launcher (Ray Train) has initialised one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from atp_ray.errors import ATPRayError
from atp_ray.pruning.structures import Masks, UnitGroup
from atp_ray.runtime.run_folder import RunFolder


@dataclass(frozen=True)
class ProcessContext:
    """This process's device, rank and world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls, device: str = "auto") -> ProcessContext:
        """The context of this process: the initialised process group's, else a single process."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ATPRayError("train.device: 'cuda' was asked for but torch sees no GPU")
        if device == "cuda" and dist.is_initialized():
            device = f"cuda:{torch.cuda.current_device()}"
        if dist.is_initialized():
            return cls(torch.device(device), dist.get_rank(), dist.get_world_size())
        return cls(torch.device(device))

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and shows progress."""
        return self.rank == 0

    def broadcast_masks(self, masks: Masks) -> dict[UnitGroup, Tensor]:
        """Rank 0's masks on every rank, so all ranks train one shape."""
        if self.world_size == 1:
            return dict(masks)
        shared = {}
        for group, mask in masks.items():
            mask = mask.detach().clone().to(self.device)
            dist.broadcast(mask, src=0)
            shared[group] = mask
        return shared

    def broadcast_value(self, value: float) -> float:
        """Rank 0's ``value`` on every rank, so all ranks take the same decision from it."""
        if self.world_size == 1:
            return value
        shared = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(shared, src=0)
        return shared.item()

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Mean of each gradient over ranks (a no-op for one process)."""
        if self.world_size == 1:
            return
        # One flat bucket: hundreds of tiny all-reduces cost far more than one of their sum.
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


# The recipe's state dict (rank 0 only, else None) and its strategy's sharded save.
ShardWriter = Callable[[Path | None], None]
Restored = tuple[dict[str, Any], Path | None]


class CheckpointStore(Protocol):
    """Where a run's resumable state goes; every rank calls both methods."""

    def save(self, step: int, state: dict[str, Any] | None, write_shards: ShardWriter) -> None:
        """Persist ``state`` (given on rank 0) and whatever ``write_shards(directory)`` writes on each rank."""

    def restore(self) -> contextlib.AbstractContextManager[Restored | None]:
        """The latest (state, shard directory), readable inside the context; None when there is none."""


@dataclass(frozen=True)
class FolderCheckpoints:
    """``checkpoint.pt`` in the run folder, written atomically by rank 0 (one process, or one disk)."""

    folder: RunFolder
    context: ProcessContext

    def save(self, step: int, state: dict[str, Any] | None, write_shards: ShardWriter) -> None:
        write_shards(None)  # a strategy with sharded state refuses: it needs a checkpoint directory
        if state is not None:
            self.folder.save_checkpoint(state)

    @contextlib.contextmanager
    def restore(self) -> Iterator[Restored | None]:
        state = self.folder.load_checkpoint()
        yield None if state is None else (state, None)
