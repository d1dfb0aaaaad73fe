"""Where a recipe runs: its device and, in a distributed run, how it agrees with its peers.

Plain ``torch.distributed``: a single process needs no process group, and the same
recipe runs unchanged on N workers once a launcher (Ray Train) has initialised one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from atp_ray.errors import ATPRayError
from atp_ray.structures import Masks, UnitGroup


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

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Mean of each gradient over ranks (a no-op for one process)."""
        if self.world_size == 1:
            return
        for param in params:
            if param.grad is not None:
                dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                param.grad /= self.world_size
