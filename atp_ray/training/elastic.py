"""An elastic ATP run: one generator, one LoRA, a pruned model at every sparsity budget.

The generator reads the budget as an input (atp_ray.pruning.generator). Each step draws one
budget (``atp.budget_draw``): ``sandwich`` takes the smallest, the largest and a random one in
turn, as once-for-all training does; ``cycle`` takes every budget in turn. The step then runs
exactly as a single run's, with that budget's controller: the generator update against task
loss + that budget's ratio loss and multipliers, then the LoRA update under a mask sampled at
that budget. One step costs what a single run's step costs, whatever the number of budgets.

All budgets freeze together, once each controller's freeze rule holds and each mask passes
its freeze check. With ``atp.nested`` (the default) the masks are cut smallest budget first,
each inside the one before: a unit cut at 0.3 is cut at 0.5 too, so the shared LoRA meets
every unit in one role only. LoRA then trains on, one frozen budget per step.

The group lasso empties the LoRA weights of units cut at every budget: the ones no model of
the run keeps. A unit cut at one budget and kept at another keeps its LoRA weights.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from atp_ray.pruning.structures import Masks, UnitGroup
from atp_ray.runtime.run_folder import budget_key
from atp_ray.training.budget import BudgetController
from atp_ray.training.mask_sources import LearnedMasks, LoraStep, Workbench

if TYPE_CHECKING:
    from atp_ray.config import RunConfig

log = logging.getLogger(__name__)

# Where an elastic run's own seeds start: far past any (seed, step) mask draw of LearnedMasks._noise.
ELASTIC_SEEDS = 2**48


class ElasticMasks(LearnedMasks):
    """ATP for several sparsity budgets at once: one budget per step, one frozen mask per budget."""

    def __init__(self, config: RunConfig, bench: Workbench):
        super().__init__(config, bench)
        self.budgets = config.atp.budgets  # ascending
        self.draw = config.atp.budget_draw
        self.nested = config.atp.nested
        self.latest_budget = self.budgets[-1]
        # Per budget: the generator's noise-free mask now, and where control ended.
        self.noise_free: dict[float, Masks] = {}
        self.frozen_by_budget: dict[float, dict[UnitGroup, torch.Tensor]] | None = None
        self.sparsity_at_control_end_by_budget: dict[float, float] = {}

    # -- which budget a step trains --------------------------------------------------------
    def budget_of_step(self, step: int) -> float:
        """The budget step ``step`` trains: the same on every rank and after resume."""
        if self.draw == "cycle":
            return self.budgets[step % len(self.budgets)]
        turn = step % 3
        if turn == 0:
            return self.budgets[0]
        if turn == 1:
            return self.budgets[-1]
        draw = self._elastic_noise(step, 0)
        return self.budgets[int(torch.randint(len(self.budgets), (1,), generator=draw, device=draw.device))]

    def _elastic_noise(self, step: int, stream: int) -> torch.Generator:
        """Draws only an elastic run makes (stream 0: the budget; 1 + i: budget i's mask for its budget terms).

        Seeded apart from the mask draws every run makes, identically on every rank and after resume.
        """
        seed = ELASTIC_SEEDS + (self.seed * 1_000_003 + step) * (len(self.budgets) + 1) + stream
        return torch.Generator(device=self.bench.context.device).manual_seed(seed)

    def _drawn(self, step: int) -> tuple[BudgetController, float]:
        budget = self.budget_of_step(step)
        return self.controllers[budget], budget

    def _budget_terms(
        self, step: int, masks: Masks, controller: BudgetController, budget: float | None
    ) -> tuple[Tensor, dict[str, float]]:
        """The drawn budget's terms, plus every other budget's on a mask sampled at it.

        Only the generator runs for those (no LLM pass), so each budget's ratio loss and
        multipliers act every step, at a single run's pace: acting on the drawn budget alone,
        the budgets lagged their annealed targets (on the embedded default at step 110 of
        150, 0.47 sampled for the 0.6 budget) and met them only at the end of the extension.
        """
        space = self.bench.space
        total, metrics = controller.loss(space.kept_fraction(masks), step)
        for index, other in enumerate(self.budgets):
            if other != budget:
                sampled = self.generator(self._elastic_noise(step, 1 + index), other)
                total = total + self.controllers[other].loss(space.kept_fraction(sampled), step)[0]
        return total, metrics

    def step(self, step: int, lora_step: LoraStep) -> tuple[Masks, dict[str, float]]:
        self.latest_budget = self.budget_of_step(step)
        if self.frozen_by_budget is not None:
            masks = self.frozen_by_budget[self.latest_budget]
            metrics = lora_step(masks)
        else:
            masks, metrics = self._control(step, lora_step)
        return masks, metrics | {"budget": self.latest_budget}

    @property
    def step_target(self) -> float:
        return self.latest_budget

    # -- the freeze ----------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """Freeze every budget at once, when each controller's rule holds and each cut passes its check."""
        if self.frozen_by_budget is not None:
            return
        space = self.bench.space
        self.noise_free = {b: self.generator.deterministic_masks(b) for b in self.budgets}
        sparsities = {b: space.sparsity(masks) for b, masks in self.noise_free.items()}
        self.noise_free_sparsity = sparsities[self.latest_budget]
        # Every controller sees every step (its patience counts held steps), so no short-circuit.
        due = [self.controllers[b].freeze_due(step, sparsities[b]) for b in self.budgets]
        if not all(due):
            return
        cuts = self._cuts(sparsities)
        passed = [self._passes_freeze_check(step, cuts[b], self.controllers[b]) for b in self.budgets]
        if not all(passed):
            return
        for budget in self.budgets:
            self._warn_if_short(step, self.controllers[budget], sparsities[budget])
        self.sparsity_at_control_end_by_budget = sparsities
        self.frozen_by_budget = cuts
        self.freeze_step = step
        log.info(
            "masks frozen at step %d: %s",
            step,
            ", ".join(f"{budget_key(b)} -> {space.sparsity(m):.4f}" for b, m in cuts.items()),
        )

    def _cuts(self, sparsities: dict[float, float]) -> dict[float, dict[UnitGroup, torch.Tensor]]:
        """Each budget's freeze cut, smallest first; nested, each inside the one before."""
        cuts: dict[float, dict[UnitGroup, torch.Tensor]] = {}
        within = None
        for budget in self.budgets:
            cuts[budget] = self._cut(self.controllers[budget], sparsities[budget], budget, within)
            if self.nested:
                within = cuts[budget]
        return cuts

    # -- what the recipe reads -----------------------------------------------------------
    def current_masks(self) -> Masks:
        return self.current_budget_masks()[self.latest_budget]

    def current_budget_masks(self) -> dict[float, Masks]:
        """Each budget's frozen mask, else the freeze's cut of the generator's masks now."""
        if self.frozen_by_budget is not None:
            return self.frozen_by_budget
        space = self.bench.space
        sparsities = {b: space.sparsity(self.generator.deterministic_masks(b)) for b in self.budgets}
        return self._cuts(sparsities)

    def final_masks(self) -> dict[float, Masks]:
        return self.frozen_by_budget

    def sparsities_at_control_end(self) -> dict[float, float]:
        return self.sparsity_at_control_end_by_budget

    def lasso_masks(self, step_masks: Masks) -> Masks:
        """Units cut at every budget: the frozen masks' union of kept units, else the noise-free ones'."""
        masks = self.frozen_by_budget or self.noise_free
        if not masks:  # before the first step ends: nothing is cut yet
            return {g: torch.ones_like(m) for g, m in step_masks.items()}
        return {g: torch.stack([m[g] for m in masks.values()]).amax(0) for g in step_masks}

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        space = self.bench.space
        frozen = self.frozen_by_budget
        return super().state_dict() | {
            "frozen_by_budget": None
            if frozen is None
            else {budget_key(b): space.masks_to_dict(m) for b, m in frozen.items()},
            "sparsity_at_control_end_by_budget": {
                budget_key(b): s for b, s in self.sparsity_at_control_end_by_budget.items()
            },
            "noise_free": {budget_key(b): space.masks_to_dict(m) for b, m in self.noise_free.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        space, device = self.bench.space, self.bench.context.device

        def masks_of(saved: dict[str, Any]) -> dict[UnitGroup, torch.Tensor]:
            return {g: m.to(device) for g, m in space.masks_from_dict(saved).items()}

        by_key = {budget_key(b): b for b in self.budgets}
        if state["frozen_by_budget"] is not None:
            self.frozen_by_budget = {by_key[k]: masks_of(m) for k, m in state["frozen_by_budget"].items()}
        self.sparsity_at_control_end_by_budget = {
            by_key[k]: s for k, s in state["sparsity_at_control_end_by_budget"].items()
        }
        self.noise_free = {by_key[k]: masks_of(m) for k, m in state["noise_free"].items()}
