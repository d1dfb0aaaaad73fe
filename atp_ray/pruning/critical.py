"""Units no mask may cut: those whose removal alone breaks the untuned model.

A few attention groups carry a model. In SmolLM2-135M, removing KV group 1 of layer 1
alone raises the calibration loss by 1.9 to 4.2 nats, depending on the text, KV group 2 of
layer 0 by 0.8 to 2.1, KV group 0 of layer 1 by 0.2 to 1.1, and every other group by less
than 0.5 (docs/method.md). A generator that cuts one of them during control does not bring
it back: the unit's gradient fades once the sigmoid saturates, and LoRA cannot rebuild what
the unit did. That was the cliff of builtin:icd10cm at 60%, seed 0. Taylor scores do not
single these units out. So each candidate is removed on its own and the loss measured,
once, before training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from atp_ray.pruning.structures import Masks, PruningSpace, UnitGroup, UnitKind

# KV groups only: a group takes its query heads with it, no single query slot costs more than
# 0.7 nats alone, and screening slots too would double the cost.
SCREENED_KINDS = (UnitKind.KV_GROUP,)


def critical_units(
    space: PruningSpace,
    loss_of: Callable[[Masks], float],
    threshold: float,
    *,
    kinds: Iterable[UnitKind] = SCREENED_KINDS,
    device: torch.device | str = "cpu",
) -> dict[UnitGroup, Tensor]:
    """Per group, a bool per unit: True where removing that unit alone raises ``loss_of`` by more than ``threshold``.

    ``loss_of`` scores a mask (the model's calibration loss under it); it is called once
    with every unit kept and once per unit of ``kinds``. A group of one unit is not
    screened: the generator never cuts a group's last unit.
    """
    full = {group: mask.to(device) for group, mask in space.full_masks().items()}
    reference = loss_of(full)
    protected = {group: torch.zeros(group.size, dtype=torch.bool, device=device) for group in space.groups}
    kinds = set(kinds)
    for group in space.groups:
        if group.kind not in kinds or group.size == 1:
            continue
        for unit in range(group.size):
            without = full[group].clone()
            without[unit] = 0.0
            protected[group][unit] = loss_of(full | {group: without}) - reference > threshold
    return protected
