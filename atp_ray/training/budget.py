"""ATP's budget controller: the sparsity target, its Lagrange multipliers and the freeze rule.

Plain numbers in, decisions out, no model: the learned mask source (atp_ray.training.mask_sources)
asks it for the generator's budget loss each control step, tells it the generator's task
loss and noise-free sparsity after each step, and asks whether (and where) to freeze.

- The target is annealed linearly from 0 to the final sparsity over the first
  ``target_anneal_fraction`` of control.
- The budget loss is a fixed-weight ratio loss plus ``l1 * gap + l2 * gap**2``, whose
  multipliers rise by gradient ascent on the sampled gap while the budget is missed.
- The mask freezes once the noise-free sparsity has held the target for ``patience``
  steps, or at the end of control once the target is reachable, or at the end of the
  bounded extension in any case; a freeze moves at most ``tolerance`` towards the target.
- The freeze check: a frozen mask must keep the loss within ``loss_ratio`` of the control
  loss (an EMA of the generator's task loss), else control goes on until the extension ends.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from atp_ray.pruning.losses import ratio_loss

if TYPE_CHECKING:
    from atp_ray.config import ATPSettings

# Decay of the control loss's EMA, the freeze check's reference: about the last ten steps.
CONTROL_LOSS_DECAY = 0.9


class BudgetController:
    """Steers the generator onto its sparsity budget and decides when its mask freezes."""

    # Everything that changes during a run; state_dict and load_state_dict read this one list.
    STATE = ("multipliers", "steps_within_tolerance", "control_loss")

    def __init__(
        self,
        sparsity: float,
        *,
        control_steps: int,
        control_cap: int,
        anneal_fraction: float,
        ratio_weight: float,
        lagrangian_lr: float,
        tolerance: float,
        patience: int,
        loss_ratio: float | None,
    ):
        self.sparsity = sparsity
        self.control_steps = control_steps  # control ends here if the target is reachable
        self.control_cap = control_cap  # and here at the latest (the bounded extension)
        self.anneal_fraction = anneal_fraction
        self.ratio_weight = ratio_weight
        self.lagrangian_lr = lagrangian_lr
        self.tolerance = tolerance
        self.patience = patience
        self.loss_ratio = loss_ratio
        # Lagrange multipliers (l1, l2) of the budget constraint, raised by gradient ascent.
        self.multipliers = torch.zeros(2)
        self.steps_within_tolerance = 0
        # The generator's recent task loss (an EMA): what a frozen mask's loss is checked against.
        self.control_loss: float | None = None

    @classmethod
    def from_settings(cls, atp: ATPSettings, steps: int, sparsity: float | None = None) -> BudgetController:
        """The controller of a run of ``steps`` steps with the config's ``atp`` section, for ``sparsity``
        (default ``atp.sparsity``; an elastic run has one controller per budget)."""
        control_steps = max(1, math.ceil(steps * atp.control_fraction))
        extension = math.ceil(steps * atp.control_extension_fraction)
        return cls(
            atp.sparsity if sparsity is None else sparsity,
            control_steps=control_steps,
            control_cap=min(steps, control_steps + extension),
            anneal_fraction=atp.target_anneal_fraction,
            ratio_weight=atp.ratio_weight,
            lagrangian_lr=atp.lagrangian_lr,
            tolerance=atp.freeze_tolerance,
            patience=atp.freeze_patience,
            loss_ratio=atp.freeze_loss_ratio,
        )

    # -- the budget --------------------------------------------------------------------
    def target(self, step: int) -> float:
        """The generator's sparsity target at ``step``: annealed linearly from 0 to the final one.

        Like gradual magnitude pruning, the shape then changes a little at a time while
        LoRA adapts, instead of the generator chasing the full budget from step one.
        """
        anneal_steps = self.anneal_fraction * self.control_steps
        if anneal_steps <= 0:
            return self.sparsity
        # Linear, not the cubic of gradual magnitude pruning: front-loading the cut made the
        # generator overshoot and oscillate around the target on the tiny trained model.
        return self.sparsity * min(1.0, (step + 1) / anneal_steps)

    def loss(self, kept: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """The budget terms for a sampled mask that keeps the fraction ``kept``; raises the multipliers."""
        target = self.target(step)
        ratio = ratio_loss(kept, 1.0 - target)
        # The fixed-weight ratio loss alone settles where the task loss pushes back as hard as it
        # pulls (on a real model, well short of a high target); the multipliers keep growing
        # while the budget is missed, so the constraint wins in the end (CoFi, Sheared-LLaMA).
        gap = (1.0 - kept) - target
        l1, l2 = self.multipliers.tolist()
        budget = self.ratio_weight * ratio + l1 * gap + l2 * gap.pow(2)
        # Ascent on the multipliers along the sampled gap, the one the ratio loss sees too. Driving
        # them by the noise-free gap instead made the two terms pull apart on a random tiny model
        # (sampled 0.45, noise-free 0.35 for a 0.4 target). Identical on every rank.
        step_gap = gap.item()
        self.multipliers += self.lagrangian_lr * torch.tensor([step_gap, step_gap**2])
        return budget, {"ratio_loss": ratio.item(), "control_target": target, "lagrange_l1": l1, "lagrange_l2": l2}

    def track_loss(self, loss: float) -> None:
        """Fold one generator step's task loss into the control loss (an EMA over about ten steps)."""
        decay = CONTROL_LOSS_DECAY
        self.control_loss = loss if self.control_loss is None else decay * self.control_loss + (1 - decay) * loss

    # -- the freeze rule ---------------------------------------------------------------
    def reachable(self, noise_free_sparsity: float) -> bool:
        """Whether a mask at ``noise_free_sparsity`` is on the target or past it (within the tolerance)."""
        return self.sparsity - noise_free_sparsity <= self.tolerance

    def freeze_due(self, step: int, noise_free_sparsity: float) -> bool:
        """Whether to freeze after ``step`` steps, the generator's noise-free mask at ``noise_free_sparsity``.

        Early, the noise-free mask must hold the target within the tolerance for ``patience``
        steps. At the end of control a mask past the target freezes too (the freeze gives the
        surplus units back, which restores pretrained weights rather than cutting any); one
        short of it waits, up to the end of the extension.
        """
        on_target = abs(self.sparsity - noise_free_sparsity) <= self.tolerance
        self.steps_within_tolerance = self.steps_within_tolerance + 1 if on_target else 0
        held = self.steps_within_tolerance >= self.patience
        ended = step >= self.control_steps and (self.reachable(noise_free_sparsity) or step >= self.control_cap)
        return held or ended

    def freeze_sparsity(self, noise_free_sparsity: float) -> float:
        """Where a freeze cuts: the target, or, for a mask short of it, at most the tolerance nearer.

        A generator that missed its target is reported, never rescued by cutting many units
        in one step that LoRA has not adapted to.
        """
        return min(self.sparsity, noise_free_sparsity + self.tolerance)

    @property
    def checks_freeze(self) -> bool:
        """Whether a freeze must pass the loss check (it is on, and the control loss is known)."""
        return self.loss_ratio is not None and self.control_loss is not None

    def accepts_freeze(self, step: int, ratio: float) -> bool:
        """Whether to freeze onto a mask whose loss is ``ratio`` times the control loss.

        Near the end of control the budget's pull is at its strongest, and the generator may
        cut a unit the model cannot lose (seen at 60% on a file of HPO definitions: a freeze
        onto such a mask doubled the training loss, and LoRA never recovered). Such a freeze
        is postponed (the generator sees the cost of that cut and undoes it; an early freeze
        must then hold the target anew) and checked again each step, up to the end of the
        extension, where the run freezes anyway.
        """
        if ratio <= self.loss_ratio or step >= self.control_cap:
            return True
        self.steps_within_tolerance = 0
        return False

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.STATE} | {"multipliers": self.multipliers.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.STATE:
            setattr(self, name, state[name])
        self.multipliers = state["multipliers"].clone()
