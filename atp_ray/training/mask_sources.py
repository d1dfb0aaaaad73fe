"""Where a run's pruning mask comes from: one class per method, chosen by name from MASK_SOURCES.

- ``atp`` (:class:`LearnedMasks`): ATP's generator learns the mask in a control phase,
  steered onto the budget by :class:`~atp_ray.training.budget.BudgetController`, then freezes it.
- ``two-step`` (:class:`FixedMasks`): units are scored once on the untuned model
  (``baseline.importance``) and the best kept at ``atp.sparsity``; frozen from step 0.
- ``lora`` (:class:`NoPruning`): every unit is kept, the dense LoRA reference.

The recipe (atp_ray.training.atp) builds the source of its config's method, then each step hands it
the LoRA step (a function of a mask) and gets back the step's mask and metrics. A source is
built from the untuned model: that is when the fixed one scores units, and when the
learned one scores its optional importance prior.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from atp_ray.errors import RunFolderError
from atp_ray.pruning.critical import critical_units
from atp_ray.pruning.generator import Offset, PruningGenerator, detach_masks
from atp_ray.pruning.importance import IMPORTANCE, Gather, importance_masks, importance_prior
from atp_ray.pruning.masking import masked
from atp_ray.pruning.structures import Masks, PruningSpace, UnitGroup
from atp_ray.pruning.widths import round_mlp_channels
from atp_ray.runtime.modeling import eval_for_backward
from atp_ray.runtime.run_folder import RunFolder, budget_key
from atp_ray.training.budget import BudgetController

if TYPE_CHECKING:
    from atp_ray.config import RunConfig
    from atp_ray.data.batches import BatchStream
    from atp_ray.runtime.process import ProcessContext

log = logging.getLogger(__name__)

# Calibration batches the critical-unit screen scores each removal on: the units it exists for
# cost 0.8 to 4.2 nats, far above the threshold, and every batch is one more pass per KV group.
SCREEN_BATCHES = 2

# One LoRA update under the given mask; returns the step's metrics.
LoraStep = Callable[[Masks], dict[str, float]]


@dataclass(frozen=True)
class Workbench:
    """What a mask source works with: the model being tuned and how this process runs it."""

    model: nn.Module
    space: PruningSpace
    context: ProcessContext
    autocast: Callable[[], contextlib.AbstractContextManager]  # the precision of the training steps
    calibration: BatchStream
    calibration_count: int  # baseline.calibration_batches: what scores and the freeze check average over
    gather: Gather  # makes parameters whole while scoring (the strategy's; ZeRO-3 shards them)

    def calibration_batch(self, index: int) -> dict[str, Tensor]:
        return {k: v.to(self.context.device) for k, v in self.calibration.batch(index).items()}

    def calibration_batches(self, count: int | None = None) -> list[dict[str, Tensor]]:
        """The first ``count`` calibration batches (``calibration_count`` when None)."""
        return [self.calibration_batch(i) for i in range(self.calibration_count if count is None else count)]

    @torch.no_grad()
    def calibration_loss(self, masks: Masks, count: int | None = None) -> float:
        """Mean loss of the masked model on the first ``count`` calibration batches (``calibration_count`` when None)."""
        was_training = self.model.training
        self.model.eval()
        losses = []
        with self.autocast(), masked(self.model, self.space, masks):
            for batch in self.calibration_batches(count):
                losses.append(self.model(**batch).loss.float())
        self.model.train(was_training)
        return torch.stack(losses).mean().item()


def protected_units(config: RunConfig, bench: Workbench) -> dict[UnitGroup, Tensor] | None:
    """The units no mask may cut: KV groups whose removal alone breaks the untuned model (atp.protect_loss_increase)."""
    threshold = config.atp.protect_loss_increase
    if threshold == 0:
        return None
    started = time.monotonic()
    loss_of = functools.partial(bench.calibration_loss, count=min(SCREEN_BATCHES, bench.calibration_count))
    protected = critical_units(bench.space, loss_of, threshold, device=bench.context.device)
    # Ranks score their own calibration shards: rank 0's decides (sent as floats, as masks are).
    shared = bench.context.broadcast_masks({g: keep.float() for g, keep in protected.items()})
    protected = {g: keep.bool() for g, keep in shared.items()}
    names = [f"{g.name}[{unit}]" for g, keep in protected.items() for unit in keep.nonzero().flatten().tolist()]
    log.info(
        "protected from pruning (removal alone raises the loss by > %.2f): %s (screened in %.0f s)",
        threshold, ", ".join(names) or "none", time.monotonic() - started,
    )
    return protected


class MaskSource:
    """The masks LoRA is tuned under, from the run's first step to its frozen end."""

    trains_generator: ClassVar[bool] = False  # whether the run has a control phase (and a group lasso)

    def __init__(
        self,
        config: RunConfig,
        bench: Workbench,
        prior: Mapping[UnitGroup, Tensor] | None = None,
        protected: Mapping[UnitGroup, Tensor] | None = None,
    ):
        atp = config.atp
        self.bench = bench
        self.target = atp.sparsity
        # Every run folder holds a generator; only the learned source trains it. (Building it also
        # draws from the random stream that LoRA dropout draws from next, whatever the method.)
        self.generator = PruningGenerator(
            bench.space,
            width=atp.generator_width,
            temperature=atp.temperature,
            base=atp.base,
            prior=prior,
            protected=protected,
            budgets=atp.budgets if atp.elastic else None,
        ).to(bench.context.device)
        self.frozen: dict[UnitGroup, Tensor] | None = None
        self.freeze_step: int | None = None
        self.sparsity_at_control_end: float | None = None
        self.noise_free_sparsity = 0.0  # of the mask the generator would emit without noise

    def step(self, step: int, lora_step: LoraStep) -> tuple[Masks, dict[str, float]]:
        """The mask of training step ``step`` and the step's metrics (the LoRA step's among them)."""
        if self.frozen is not None:
            return self.frozen, lora_step(self.frozen)
        return self._control(step, lora_step)

    def _control(self, step: int, lora_step: LoraStep) -> tuple[Masks, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} is frozen from the start")

    def after_step(self, step: int) -> None:
        """Called once ``step`` steps are done: where the mask may freeze."""

    def current_masks(self) -> Masks:
        """The mask the run would end with if it froze now."""
        return self.frozen

    def final_masks(self) -> dict[float, Masks]:
        """The frozen mask of each sparsity budget the run trained for (one, except for an elastic run)."""
        return {self.target: self.frozen}

    def sparsities_at_control_end(self) -> dict[float, float]:
        """Each budget's noise-free sparsity when its mask froze (a fixed mask's own)."""
        return {self.target: self.sparsity_at_control_end}

    def lasso_masks(self, step_masks: Masks) -> Masks:
        """What the group lasso empties: the LoRA weights of units these masks cut (the step's own)."""
        return step_masks

    @property
    def step_target(self) -> float:
        """The sparsity budget of the latest step (an elastic run draws one per step)."""
        return self.target

    def _freeze(self, masks: dict[UnitGroup, Tensor], step: int) -> None:
        self.frozen = masks
        self.freeze_step = step
        self.noise_free_sparsity = self.bench.space.sparsity(masks)

    def state_dict(self) -> dict[str, Any]:
        space = self.bench.space
        return {
            "generator": self.generator.state_dict(),
            "frozen_masks": space.masks_to_dict(self.frozen) if self.frozen is not None else None,
            "freeze_step": self.freeze_step,
            "sparsity_at_control_end": self.sparsity_at_control_end,
            "noise_free_sparsity": self.noise_free_sparsity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        if state["frozen_masks"] is not None:
            masks = self.bench.space.masks_from_dict(state["frozen_masks"])
            self.frozen = {g: m.to(self.bench.context.device) for g, m in masks.items()}
        self.freeze_step = state["freeze_step"]
        self.sparsity_at_control_end = state["sparsity_at_control_end"]
        self.noise_free_sparsity = state["noise_free_sparsity"]


class FixedMasks(MaskSource):
    """two-step: prune, then tune. Units scored once on the first calibration batches
    (``baseline.importance``), the best kept at ``atp.sparsity``, uniform per layer."""

    def __init__(self, config: RunConfig, bench: Workbench):
        masks = self.choose(config, bench)
        super().__init__(config, bench)
        self._freeze(masks, step=0)
        self.sparsity_at_control_end = self.noise_free_sparsity

    @staticmethod
    def choose(config: RunConfig, bench: Workbench) -> dict[UnitGroup, Tensor]:
        if config.baseline.mask_run is not None:
            masks = mask_of_run(config, bench.space)
            return {g: m.to(bench.context.device) for g, m in masks.items()}
        masks = importance_masks(
            bench.model,
            bench.space,
            config.atp.sparsity,
            IMPORTANCE[config.baseline.importance],
            bench.calibration_batches(),
            config.atp.mlp_channel_multiple,
            bench.gather,
            protected=protected_units(config, bench),
        )
        log.info("%s mask (%s): sparsity %.4f", config.method, config.baseline.importance, bench.space.sparsity(masks))
        return bench.context.broadcast_masks(masks)  # ranks scored different calibration shards


def mask_of_run(config: RunConfig, space: PruningSpace) -> dict[UnitGroup, Tensor]:
    """The final mask of ``baseline.mask_run``, checked to be of this model and for ``atp.sparsity``.

    ATP's mask with a whole run of tuning: the run that found it tuned it only after its freeze.
    The mask is taken as that run froze it, on its target or short of it (its summary says).
    """
    folder = RunFolder(Path(config.baseline.mask_run))
    if not folder.mask.is_file():
        raise RunFolderError(f"baseline.mask_run {folder.root}: no finished run there (no mask.json)")
    saved = folder.read_config()
    if saved["model"]["path"] != config.model.path:
        raise RunFolderError(
            f"baseline.mask_run {folder.root} pruned {saved['model']['path']!r}, this run tunes {config.model.path!r}"
        )
    elastic = folder.mask_budgets() is not None  # its mask at this run's atp.sparsity, one of its budgets
    if not elastic and saved["atp"]["sparsity"] != config.atp.sparsity:
        raise RunFolderError(
            f"baseline.mask_run {folder.root} pruned for atp.sparsity {saved['atp']['sparsity']}, this run's is "
            f"{config.atp.sparsity}: set atp.sparsity={saved['atp']['sparsity']}"
        )
    masks = folder.read_mask(space, budget=config.atp.sparsity if elastic else None)
    log.info("two-step mask read from %s: sparsity %.4f", folder.root, space.sparsity(masks))
    return masks


class NoPruning(FixedMasks):
    """lora: every unit kept, the dense reference."""

    @staticmethod
    def choose(config: RunConfig, bench: Workbench) -> dict[UnitGroup, Tensor]:
        return {g: m.to(bench.context.device) for g, m in bench.space.full_masks().items()}


class LearnedMasks(MaskSource):
    """ATP: the generator learns the mask under the budget controller, then freezes it.

    Each control step first trains the generator (LLM and LoRA frozen) on a calibration
    batch against task loss + budget terms, then samples a hard mask for the LoRA step
    (``atp.control_step=joint`` instead takes the generator's task-loss gradient from the
    LoRA step's own backward pass). After each step the budget controller says whether the
    generator's noise-free mask freezes; the frozen mask must pass the freeze check.
    """

    trains_generator = True

    def __init__(self, config: RunConfig, bench: Workbench):
        super().__init__(config, bench, prior=self._prior(config, bench), protected=protected_units(config, bench))
        self.atp = config.atp
        self.seed = config.train.seed
        self.max_grad_norm = config.train.max_grad_norm
        # One controller per budget the run trains for (an elastic run has several).
        self.controllers = {
            budget: BudgetController.from_settings(config.atp, config.train.steps, sparsity=budget)
            for budget in config.atp.budgets
        }
        self.optimizer = torch.optim.AdamW(self.generator.parameters(), lr=config.atp.generator_lr)
        self.scheduled = config.atp.sparsity_control == "schedule"
        self.offset: Offset = 0.0  # added to the logits of this control step's masks
        self.offset_step: int | None = None  # the step whose target self.offset meets (on the schedule)

    @property
    def budget(self) -> BudgetController:
        """The controller of the run's target (an elastic run's largest budget)."""
        return self.controllers[self.target]

    @staticmethod
    def _prior(config: RunConfig, bench: Workbench) -> dict[UnitGroup, Tensor] | None:
        """ATP's optional start: Taylor scores of the untuned model rank each layer's units (atp.importance_prior).

        Off by default; configs/embedded.yaml sets 3 with two calibration blocks, which there lowered
        held-out perplexity at 20/40/60% on two seeds, kept the quiz, and made the demo run cheaper
        (docs/results.md: ATP's own cost). Under ZeRO-3 the scores read one gathered layer at a time.
        """
        if config.atp.importance_prior == 0:
            return None
        scores = IMPORTANCE["taylor"].score(bench.model, bench.space, bench.calibration_batches(), bench.gather)
        prior = importance_prior(bench.space, scores, config.atp.importance_prior)
        return bench.context.broadcast_masks(prior)  # per-unit tensors like masks: rank 0's shard decides

    # -- control steps -------------------------------------------------------------------
    def _control(self, step: int, lora_step: LoraStep) -> tuple[Masks, dict[str, float]]:
        controller, budget = self._drawn(step)
        self._follow_schedule(step, controller)
        if step % self.atp.generator_every != 0:
            masks = self._sample(step, budget)
            return masks, lora_step(masks)
        if self.atp.control_step == "joint":
            masks, metrics = self._joint_step(step, lora_step, controller, budget)
        else:
            metrics = self._generator_step(step, controller, budget)
            masks = self._sample(step, budget)
            metrics |= lora_step(masks)
        controller.track_loss(metrics["generator_loss"])
        return masks, metrics

    def _follow_schedule(self, step: int, controller: BudgetController) -> None:
        """Set the logit offsets of step ``step``'s masks: none, or those that put them on the annealed target.

        Under the Lagrangian the mask lags the target while the multipliers grow, then catches
        up in bursts of cuts that LoRA has not adapted to (docs/results.md). On the schedule
        (atp.sparsity_control), the attention and the MLP each lose the target's share as it
        rises, and the generator learns which units go. One offset for both parts cut the MLP
        to 32% of its channels at 0.6 on SmolLM2 (held-out perplexity 3,196): a unit's logit
        says what it is worth, not how many parameters it holds.
        """
        # after_step(n) finds step n's offsets on the weights step n starts from: no second bisection.
        if self.scheduled and self.offset_step != step:
            self.offset, self.offset_step = self.generator.offsets_for_sparsity(controller.target(step)), step

    def _drawn(self, step: int) -> tuple[BudgetController, float | None]:
        """The budget controller of step ``step`` and the budget its generator reads (None: it reads none)."""
        return self.budget, None

    def _generator_step(self, step: int, controller: BudgetController, budget: float | None) -> dict[str, float]:
        """One generator update on a calibration batch; LLM and LoRA stay frozen."""
        bench = self.bench
        self.generator.train()
        eval_for_backward(bench.model)  # the LLM is frozen here: no LoRA dropout, whatever the previous step left
        masks = self.generator(self._noise(step, 0), budget, self.offset)
        batch = bench.calibration_batch(step)
        # Backward inside the mask's context: activation checkpointing recomputes layers there.
        with masked(bench.model, bench.space, masks):
            with bench.autocast():
                task_loss = bench.model(**batch).loss
            budget_loss, metrics = self._budget_terms(step, masks, controller, budget)
            # Gradients of the generator alone: LoRA keeps requires_grad (a DeepSpeed engine owns
            # it and must not see it toggled) and gets no .grad from this pass.
            params = list(self.generator.parameters())
            grads = torch.autograd.grad(task_loss.float() + budget_loss, params, allow_unused=True)
        for param, grad in zip(params, grads):
            param.grad = grad
        self._update_generator()
        return {"generator_loss": task_loss.item(), **metrics}

    def _joint_step(
        self, step: int, lora_step: LoraStep, controller: BudgetController, budget: float | None
    ) -> tuple[Masks, dict[str, float]]:
        """One LoRA update whose backward pass also gives the generator its task-loss gradient.

        The sampled mask enters the LLM as a leaf tensor: the LoRA step's backward leaves
        d(task loss)/d(mask) in its .grad, which is then carried back through the generator
        with the budget terms. One forward and backward of the LLM per control step instead
        of two; the generator sees training batches (not calibration ones) under LoRA
        dropout, and updates at the same time as LoRA rather than just before it.
        """
        self.generator.train()
        # The same on every rank: same weights, same noise, same offset.
        masks = self.generator(self._noise(step, 0), budget, self.offset)
        leaves = {g: m.detach().requires_grad_() for g, m in masks.items()}
        metrics = lora_step(leaves)
        budget_loss, budget_metrics = self._budget_terms(step, masks, controller, budget)
        # The strategy's backward already divided each micro-batch's loss by the accumulation.
        roots, grads = list(masks.values()), [leaf.grad for leaf in leaves.values()]
        if budget_loss.requires_grad:  # not on the schedule
            roots, grads = [budget_loss, *roots], [None, *grads]
        torch.autograd.backward(roots, grads)
        self._update_generator()
        return detach_masks(leaves), {"generator_loss": metrics["loss"], **metrics, **budget_metrics}

    def _budget_terms(
        self, step: int, masks: Masks, controller: BudgetController, budget: float | None
    ) -> tuple[Tensor, dict[str, float]]:
        """The generator's budget loss for the mask it sampled this step (``budget``'s, under ``controller``).

        None on the schedule: the offsets meet the budget, and a multiplier fed the noise's gap
        only pushed the logits apart by unit size.
        """
        if self.scheduled:
            return torch.zeros(()), {"control_target": controller.target(step)}
        return controller.loss(self.bench.space.kept_fraction(masks), step)

    def _update_generator(self) -> None:
        """Average the generator's gradients over ranks, clip and step (it stays replicated)."""
        params = list(self.generator.parameters())
        self.bench.context.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _sample(self, step: int, budget: float | None) -> dict[UnitGroup, Tensor]:
        """A noisy hard mask from the generator for one LoRA step, the same on every rank."""
        self.generator.train()
        with torch.no_grad():
            masks = detach_masks(self.generator(self._noise(step, 1), budget, self.offset))
        return self.bench.context.broadcast_masks(masks)

    def _noise(self, step: int, stream: int) -> torch.Generator:
        # Mask noise depends only on (seed, step, which draw): identical on every rank and after resume.
        seed = (self.seed * 1_000_003 + step) * 2 + stream
        return torch.Generator(device=self.bench.context.device).manual_seed(seed)

    # -- the freeze ----------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """Freeze the mask when the budget controller says so and the freeze check passes."""
        if self.frozen is not None:
            return
        controller = self.budget
        # On the schedule, the offset follows the generator's update: its mask is what the next step sees.
        self._follow_schedule(step, controller)
        self.noise_free_sparsity = self.bench.space.sparsity(self.generator.deterministic_masks(offset=self.offset))
        if not controller.freeze_due(step, self.noise_free_sparsity):
            return
        masks = self._cut(controller, self.noise_free_sparsity)
        if not self._passes_freeze_check(step, masks, controller):
            return
        self._warn_if_short(step, controller, self.noise_free_sparsity)
        self.sparsity_at_control_end = self.noise_free_sparsity
        self._freeze(masks, step)
        log.info("mask frozen at step %d: sparsity %.4f", step, self.noise_free_sparsity)

    def _warn_if_short(self, step: int, controller: BudgetController, noise_free_sparsity: float) -> None:
        if controller.reachable(noise_free_sparsity):
            return
        log.warning(
            "control ended at step %d with noise-free sparsity %.4f, %.4f short of the target %.4f "
            "(tolerance %.4f): freezing at most the tolerance nearer, the run misses its target",
            step, noise_free_sparsity, controller.sparsity - noise_free_sparsity, controller.sparsity,
            controller.tolerance,
        )

    def _cut(
        self,
        controller: BudgetController,
        noise_free_sparsity: float,
        budget: float | None = None,
        within: Masks | None = None,
    ) -> dict[UnitGroup, Tensor]:
        """The mask a freeze cuts now: at ``controller``'s freeze sparsity, MLP widths rounded, the same on every rank.

        ``within`` (a smaller budget's cut) nests it: a unit cut there stays cut, rounding included.
        """
        masks = self.generator.masks_at_sparsity(
            controller.freeze_sparsity(noise_free_sparsity), budget=budget, within=within, by_part=self.scheduled
        )
        scores = self.generator.logits(budget)
        if within is not None:
            scores = {g: score.masked_fill(within[g] == 0, -math.inf) for g, score in scores.items()}
        masks = round_mlp_channels(self.bench.space, masks, self.atp.mlp_channel_multiple, scores)
        return self.bench.context.broadcast_masks(masks)

    def _passes_freeze_check(self, step: int, masks: Masks, budget: BudgetController) -> bool:
        """Whether freezing onto ``masks`` keeps the loss near ``budget``'s control loss (atp.freeze_loss_ratio)."""
        if not budget.checks_freeze:
            return True
        loss = self.bench.calibration_loss(masks)
        ratio = self.bench.context.broadcast_value(loss / budget.control_loss)  # ranks score their own batches
        if not budget.accepts_freeze(step, ratio):
            log.info("freeze postponed at step %d: the mask's loss %.3f is %.2fx the control loss", step, loss, ratio)
            return False
        if ratio > budget.loss_ratio:
            log.warning(
                "freeze at step %d (end of the control extension) raises the loss to %.3f, %.2fx the control "
                "loss %.3f (atp.freeze_loss_ratio %.2f): the run may not recover",
                step, loss, ratio, budget.control_loss, budget.loss_ratio,
            )
        else:
            log.info("freeze check at step %d: loss %.3f, %.2fx the control loss", step, loss, ratio)
        return True

    def current_masks(self) -> Masks:
        """The frozen mask, else the freeze's cut of the generator's mask now."""
        if self.frozen is not None:
            return self.frozen
        cut = self.generator.masks_at_sparsity(
            self.budget.freeze_sparsity(self.noise_free_sparsity), by_part=self.scheduled
        )
        return self.bench.context.broadcast_masks(cut)

    def state_dict(self) -> dict[str, Any]:
        controllers = {budget_key(b): c.state_dict() for b, c in self.controllers.items()}
        return super().state_dict() | {"optimizer": self.optimizer.state_dict(), "controllers": controllers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        for budget, controller in self.controllers.items():
            controller.load_state_dict(state["controllers"][budget_key(budget)])


# THE list of methods: config validation (RunConfig.method) reads its choices from here.
MASK_SOURCES: dict[str, type[MaskSource]] = {"atp": LearnedMasks, "two-step": FixedMasks, "lora": NoPruning}
