"""One ATP run on one process: setup -> train -> save, read top to bottom.

Each step of the control phase first trains the generator (LLM and LoRA frozen) on a
calibration batch against task loss + ratio loss + a Lagrangian budget term (towards a
sparsity target annealed from 0 to the final one), then samples a hard mask and trains
LoRA on a training batch against task loss + group lasso (``atp.control_step=joint``
instead takes the generator's task-loss gradient from the LoRA step's own backward pass:
cheaper, measured worse; see docs/results.md). Once the generator's
noise-free mask has held the target sparsity for a while, or the control phase ends
(extended, bounded, while the target is missed), the mask is frozen, at most the freeze
tolerance from where the generator stands, and LoRA training continues under it, with
the lasso weight raised over the final steps so the LoRA weights of cut structures reach zero.

The run folder is resumable: a killed run started again on the same folder continues
from its last checkpoint with the same step count, data order and random state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig
from safetensors.torch import save_file
from tqdm.auto import tqdm

from atp_ray.config import RunConfig
from atp_ray.data import BatchStream, build_splits
from atp_ray.distillation import distillation_loss, teacher_logits
from atp_ray.evaluate import perplexity
from atp_ray.generator import PruningGenerator, detach_masks
from atp_ray.importance import IMPORTANCE, importance_masks, importance_prior
from atp_ray.losses import lora_group_lasso, ratio_loss
from atp_ray.masking import masked
from atp_ray.memory_plan import GIB, ModelShape, resolve_checkpointing
from atp_ray.modeling import enable_activation_checkpointing, eval_for_backward, load_model, load_tokenizer
from atp_ray.process import CheckpointStore, FolderCheckpoints, ProcessContext
from atp_ray.run_folder import RunFolder, atomic_write_bytes, atomic_write_json
from atp_ray.strategy import strategy_from_config, use_bf16
from atp_ray.structures import Masks, PruningSpace, UnitGroup
from atp_ray.widths import round_mlp_channels

log = logging.getLogger(__name__)

# Held-out blocks scored at the end of a run; enough for a stable mean, cheap on CPU.
FINAL_EVAL_BLOCKS = 32
# Decay of the control loss's EMA, the freeze check's reference: about the last ten steps.
CONTROL_LOSS_DECAY = 0.9


StepHook = Callable[[int, Masks, dict[str, float]], None]


def run_atp(
    config: RunConfig,
    run_dir: str | Path,
    context: ProcessContext | None = None,
    *,
    checkpoints: CheckpointStore | None = None,
    on_step: StepHook | None = None,
) -> dict[str, Any]:
    """Run (or resume) ATP into ``run_dir``; returns the run summary.

    ``context`` is this process's place in a distributed run (default: one process);
    ``checkpoints`` where resumable state goes (default: ``checkpoint.pt`` in the run
    folder); ``on_step(step, masks, metrics)`` is called after every step on every rank.
    """
    context = context or ProcessContext.current(config.train.device)
    recipe = ATPRecipe(config, Path(run_dir), context, checkpoints=checkpoints, on_step=on_step)
    recipe.setup()
    recipe.train()
    return recipe.save()


class ATPRecipe:
    """The state of one ATP run and its three stages."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        context: ProcessContext,
        *,
        checkpoints: CheckpointStore | None = None,
        on_step: StepHook | None = None,
    ):
        self.config = config
        self.folder = RunFolder(run_dir)
        self.context = context
        self.checkpoints = checkpoints or FolderCheckpoints(self.folder, context)
        self.on_step = on_step
        self.device = context.device
        self.target_kept = 1.0 - config.atp.sparsity
        self.control_steps = max(1, math.ceil(config.train.steps * config.atp.control_fraction))
        extension = math.ceil(config.train.steps * config.atp.control_extension_fraction)
        self.control_cap = min(config.train.steps, self.control_steps + extension)

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        self._prepare_folder()
        torch.manual_seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model.path)
        splits = build_splits(cfg.data, tokenizer, cfg.train.seed)
        rank, world = self.context.rank, self.context.world_size
        self.train_stream = BatchStream(splits.train, cfg.train.batch_size, cfg.train.seed, rank, world)
        self.calibration_stream = BatchStream(
            splits.calibration, cfg.train.calibration_batch_size, cfg.train.seed + 1, rank, world
        )
        self.eval_blocks = splits.evaluation

        self.strategy = strategy_from_config(cfg, self.context)
        lora = LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        self.model = self.strategy.build_model(functools.partial(load_model, cfg.model.path, cfg.model.dtype), lora)
        self.space = PruningSpace.from_config(self.model.config)
        self.checkpointing = self._wants_checkpointing()
        if self.checkpointing:
            enable_activation_checkpointing(self.model)
        fixed_masks = self._fixed_masks(self.model)
        self.lora_params = [p for p in self.model.parameters() if p.requires_grad]
        # Base parameters, LoRA excluded (ZeRO-3 keeps a shard per rank; ds_numel is the whole).
        self.dense_params = sum(
            getattr(p, "ds_numel", p.numel()) for n, p in self.model.named_parameters() if "lora_" not in n
        )
        self.generator = PruningGenerator(
            self.space,
            width=cfg.atp.generator_width,
            temperature=cfg.atp.temperature,
            base=cfg.atp.base,
            prior=self._importance_prior(self.model),
        ).to(self.device)

        self.lora_optimizer = torch.optim.AdamW(
            self.lora_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.generator_optimizer = torch.optim.AdamW(self.generator.parameters(), lr=cfg.atp.generator_lr)
        self.lora_scheduler = torch.optim.lr_scheduler.LambdaLR(self.lora_optimizer, self._lora_lr_factor)
        self.strategy.prepare(self.model, self.lora_params, self.lora_optimizer, self.lora_scheduler)
        # bf16 has one owner: the strategy's engine when it casts the model, else autocast here.
        precision = "fp32" if self.strategy.owns_bf16 else cfg.train.precision
        self.autocast = functools.partial(_autocast, precision, self.device)

        self.step = 0
        # A baseline's mask is frozen from step 0, so it never trains the generator.
        self.frozen_masks: dict[UnitGroup, torch.Tensor] | None = fixed_masks
        self.freeze_step: int | None = None if fixed_masks is None else 0
        self.steps_within_tolerance = 0
        # Lagrange multipliers (l1, l2) of the budget constraint, raised by gradient ascent.
        self.multipliers = torch.zeros(2)
        # A baseline's frozen mask from step 0, as a resumed run reads it back from its checkpoint.
        self.noise_free_sparsity = 0.0 if fixed_masks is None else self.space.sparsity(fixed_masks)
        # The generator's recent task loss (an EMA): what the frozen mask's loss is checked against.
        self.control_loss: float | None = None
        self.sparsity_at_control_end: float | None = None if fixed_masks is None else self.space.sparsity(fixed_masks)
        self.log_window: list[dict[str, float]] = []  # per-step metrics since the last metrics row
        self._resume()
        if self.context.is_main:
            _truncate_metrics(self.folder.metrics, self.step)

    def _wants_checkpointing(self) -> bool:
        """train.activation_checkpointing, auto resolved by the memory plan against this GPU's memory."""
        gpu_memory_gib = None
        if self.device.type == "cuda":
            gpu_memory_gib = torch.cuda.get_device_properties(self.device).total_memory / GIB
        return resolve_checkpointing(self.config, ModelShape.from_config(self.model.config), gpu_memory_gib)

    def _fixed_masks(self, model: torch.nn.Module) -> dict[UnitGroup, torch.Tensor] | None:
        """The mask a baseline tunes under from step 0; None for ATP, whose generator learns it.

        two-step scores units once on the first calibration batches (baseline.importance) and
        keeps the best at atp.sparsity, uniform per layer; lora keeps every unit.
        """
        cfg = self.config
        if cfg.method == "atp":
            return None
        if cfg.method == "lora":
            return {g: m.to(self.device) for g, m in self.space.full_masks().items()}
        with _autocast(cfg.train.precision, self.device):
            masks = importance_masks(
                model,
                self.space,
                cfg.atp.sparsity,
                IMPORTANCE[cfg.baseline.importance],
                self._calibration_batches(),
                cfg.atp.mlp_channel_multiple,
                self.strategy.gathered,
            )
        log.info("%s mask (%s): sparsity %.4f", cfg.method, cfg.baseline.importance, self.space.sparsity(masks))
        return self.context.broadcast_masks(masks)  # ranks scored different calibration shards

    def _importance_prior(self, model: torch.nn.Module) -> dict[UnitGroup, torch.Tensor] | None:
        """ATP's optional start: Taylor scores of the untuned model rank each layer's units (atp.importance_prior).

        Off by default; configs/embedded.yaml sets 3 with two calibration blocks, which there lowered
        held-out perplexity at 20/40/60% on two seeds, kept the quiz, and made the demo run cheaper
        (docs/results.md: ATP's own cost). Under ZeRO-3 the scores read one gathered layer at a time.
        """
        cfg = self.config
        if cfg.method != "atp" or cfg.atp.importance_prior == 0:
            return None
        with _autocast(cfg.train.precision, self.device):
            scores = IMPORTANCE["taylor"].score(model, self.space, self._calibration_batches(), self.strategy.gathered)
        prior = importance_prior(self.space, scores, cfg.atp.importance_prior)
        return self.context.broadcast_masks(prior)  # per-unit tensors like masks: rank 0's shard decides

    def _calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        """The first baseline.calibration_batches calibration batches: what importance scores average over."""
        count = self.config.baseline.calibration_batches
        return [self._to_device(self.calibration_stream.batch(i)) for i in range(count)]

    def _prepare_folder(self) -> None:
        folder = self.folder
        resolved = self.config.to_dict()
        folder.check_can_run(resolved)
        if self.context.is_main:
            folder.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder.config, yaml.safe_dump(resolved, sort_keys=False).encode())

    def _resume(self) -> None:
        with self.checkpoints.restore() as restored:
            if restored is None:
                return
            state, shards = restored
            self.strategy.load(state, shards)
        self.generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.step = state["step"]
        self.steps_within_tolerance = state["steps_within_tolerance"]
        self.control_loss = state["control_loss"]
        self.multipliers = state["multipliers"].clone()
        self.sparsity_at_control_end = (
            state["sparsity_at_control_end"] if state["sparsity_at_control_end"] >= 0 else None
        )
        # A checkpoint between two rows carries the steps already taken toward the next row.
        self.log_window = state.get("log_window", [])
        self.freeze_step = state["freeze_step"] if state["freeze_step"] >= 0 else None
        if state["frozen_masks"]:
            self.frozen_masks = {
                g: m.to(self.device) for g, m in self.space.masks_from_dict(state["frozen_masks"]).items()
            }
            self.noise_free_sparsity = self.space.sparsity(self.frozen_masks)
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        log.info("resumed %s at step %d", self.folder.root, self.step)

    # -- train -------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.config.train
        progress = tqdm(
            total=cfg.steps, initial=self.step, desc="ATP", disable=not self.context.is_main, dynamic_ncols=True
        )
        started = time.monotonic()
        while self.step < cfg.steps:
            controlling = self.frozen_masks is None and self.step % self.config.atp.generator_every == 0
            if controlling and self.config.atp.control_step == "joint":
                masks, metrics = self._joint_step()
            else:
                metrics = self._generator_step() if controlling else {}
                masks = self.frozen_masks if self.frozen_masks is not None else self._sample_masks()
                metrics |= self._lora_step(masks)
            self.step += 1
            if "generator_loss" in metrics:
                self._track_control_loss(metrics["generator_loss"])
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                metrics |= self._held_out(self._current_masks())
            if self.on_step is not None:
                self.on_step(self.step, masks, metrics)
            if self.frozen_masks is None:
                self._maybe_freeze()
            metrics["noise_free_sparsity"] = self.noise_free_sparsity
            self.log_window.append(metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", sparsity=f"{metrics['sparsity']:.3f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(self.log_window, time.monotonic() - started)
                self.log_window = []
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self._checkpoint()
        progress.close()

    def _generator_step(self) -> dict[str, float]:
        """One generator update on a calibration batch; LLM and LoRA stay frozen."""
        self.generator.train()
        eval_for_backward(self.model)  # the LLM is frozen here: no LoRA dropout, whatever the previous step left
        noise = torch.Generator(device=self.device).manual_seed(self._noise_seed(0))
        masks = self.generator(noise)
        batch = self._to_device(self.calibration_stream.batch(self.step))
        # Backward inside the mask's context: activation checkpointing recomputes layers there.
        with masked(self.model, self.space, masks):
            with self.autocast():
                task_loss = self.model(**batch).loss
            budget, metrics = self._budget_loss(masks)
            # Gradients of the generator alone: LoRA keeps requires_grad (a DeepSpeed engine owns
            # it and must not see it toggled) and gets no .grad from this pass.
            params = list(self.generator.parameters())
            grads = torch.autograd.grad(task_loss.float() + budget, params, allow_unused=True)
        for param, grad in zip(params, grads):
            param.grad = grad
        self._update_generator()
        return {"generator_loss": task_loss.item(), **metrics}

    def _joint_step(self) -> tuple[Masks, dict[str, float]]:
        """One LoRA update whose backward pass also gives the generator its task-loss gradient.

        The sampled mask enters the LLM as a leaf tensor: the LoRA step's backward leaves
        d(task loss)/d(mask) in its .grad, which is then carried back through the generator
        with the budget terms. One forward and backward of the LLM per control step instead
        of two; the generator sees training batches (not calibration ones) under LoRA
        dropout, and updates at the same time as LoRA rather than just before it.
        """
        self.generator.train()
        noise = torch.Generator(device=self.device).manual_seed(self._noise_seed(0))
        masks = self.generator(noise)  # the same on every rank: same weights, same noise
        leaves = {g: m.detach().requires_grad_() for g, m in masks.items()}
        metrics = self._lora_step(leaves)
        budget, budget_metrics = self._budget_loss(masks)
        # The strategy's backward already divided each micro-batch's loss by the accumulation.
        torch.autograd.backward([budget, *masks.values()], [None, *(leaf.grad for leaf in leaves.values())])
        self._update_generator()
        return detach_masks(leaves), {"generator_loss": metrics["loss"], **metrics, **budget_metrics}

    def _budget_loss(self, masks: Masks) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator's budget terms for a sampled mask; raises the Lagrange multipliers."""
        kept = self.space.kept_fraction(masks)
        target = self._control_target()
        ratio = ratio_loss(kept, 1.0 - target)
        # The fixed-weight ratio loss alone settles where the task loss pushes back as hard as it
        # pulls (on a real model, well short of a high target); the multipliers keep growing
        # while the budget is missed, so the constraint wins in the end (CoFi, Sheared-LLaMA).
        gap = (1.0 - kept) - target
        l1, l2 = self.multipliers.tolist()
        budget = self.config.atp.ratio_weight * ratio + l1 * gap + l2 * gap.pow(2)
        # Ascent on the multipliers along the sampled gap, the one the ratio loss sees too. Driving
        # them by the noise-free gap instead made the two terms pull apart on a random tiny model
        # (sampled 0.45, noise-free 0.35 for a 0.4 target). Identical on every rank.
        step_gap = gap.item()
        self.multipliers += self.config.atp.lagrangian_lr * torch.tensor([step_gap, step_gap**2])
        return budget, {"ratio_loss": ratio.item(), "control_target": target, "lagrange_l1": l1, "lagrange_l2": l2}

    def _update_generator(self) -> None:
        """Average the generator's gradients over ranks, clip and step (it stays replicated)."""
        params = list(self.generator.parameters())
        self.context.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, self.config.train.max_grad_norm)
        self.generator_optimizer.step()
        self.generator_optimizer.zero_grad(set_to_none=True)

    def _control_target(self) -> float:
        """The generator's sparsity target at this step: annealed linearly from 0 to the final one.

        Like gradual magnitude pruning, the shape then changes a little at a time while
        LoRA adapts, instead of the generator chasing the full budget from step one.
        """
        atp = self.config.atp
        anneal_steps = atp.target_anneal_fraction * self.control_steps
        if anneal_steps <= 0:
            return atp.sparsity
        # Linear, not the cubic of gradual magnitude pruning: front-loading the cut made the
        # generator overshoot and oscillate around the target on the tiny trained model.
        return atp.sparsity * min(1.0, (self.step + 1) / anneal_steps)

    def _sample_masks(self) -> dict[UnitGroup, torch.Tensor]:
        """A noisy hard mask from the generator for one LoRA step, the same on every rank."""
        self.generator.train()
        noise = torch.Generator(device=self.device).manual_seed(self._noise_seed(1))
        with torch.no_grad():
            masks = detach_masks(self.generator(noise))
        return self.context.broadcast_masks(masks)

    def _lora_step(self, masks: Masks) -> dict[str, float]:
        """One LoRA update on a training batch: task loss + weighted group lasso (+ weighted distillation)."""
        self.model.train()
        lasso_weight = self._lasso_weight()
        distill = self.config.distill
        lr = self.lora_scheduler.get_last_lr()[0]
        accumulation = self.config.distributed.gradient_accumulation_steps
        task_losses, distill_losses = [], []
        for micro in range(accumulation):
            batch = self._to_device(self.train_stream.batch(self.step * accumulation + micro))
            teacher = None
            if distill.weight > 0:
                # Before the mask's context: the teacher is the unmasked model. Every rank runs it
                # (under ZeRO-3 its forward gathers the same shards as the student's).
                with self.autocast():
                    teacher = teacher_logits(self.model, batch, distill.teacher)
            # Backward inside the mask's context: activation checkpointing recomputes layers there.
            with masked(self.model, self.space, masks):
                with self.autocast():
                    output = self.model(**batch)
                task_loss = output.loss
                # LoRA weights are whole on every rank (ZeRO-3 keeps them unpartitioned), so
                # the lasso reads the same rows and columns as on one process.
                with self.strategy.whole_params(self.lora_params):
                    lasso = lora_group_lasso(self.model, self.space, masks)
                loss = task_loss.float() + lasso_weight * lasso
                if teacher is not None:
                    kl = distillation_loss(output.logits, teacher, batch["labels"], distill.temperature, distill.top_k)
                    loss = loss + distill.weight * kl
                    distill_losses.append(kl.item())
                self.strategy.backward(loss)
            task_losses.append(task_loss.item())
        self.strategy.step()  # average, clip, optimizer and scheduler step
        metrics = {
            "loss": sum(task_losses) / accumulation,
            "sparsity": self.space.sparsity(masks),
            "group_lasso": lasso.item(),
            "lasso_weight": lasso_weight,
            "lr": lr,
            "generator_lr": self.generator_optimizer.param_groups[0]["lr"],
            "params": self._params_kept(masks),
        }
        if self.frozen_masks is not None:
            metrics["ratio_loss"] = float(ratio_loss(self.space.kept_fraction(masks), self.target_kept))
        if distill_losses:
            metrics["distill"] = sum(distill_losses) / accumulation  # the KL before its weight
        return metrics

    def _maybe_freeze(self) -> None:
        """Freeze the mask at the end of control, or early once the generator holds the target.

        Early, the noise-free mask must hold the target within ``freeze_tolerance`` for
        ``freeze_patience`` steps. At the end of control a mask past the target also freezes:
        the freeze gives the surplus units back in the generator's order, which restores
        pretrained weights rather than cutting any. A mask short of the target moves at most
        ``freeze_tolerance`` towards it: that generator is reported (log warning,
        summary.json), never rescued by cutting many units in one step that LoRA has not
        adapted to.
        """
        atp = self.config.atp
        target = atp.sparsity
        self.noise_free_sparsity = self.space.sparsity(self.generator.deterministic_masks())
        shortfall = target - self.noise_free_sparsity
        on_target = abs(shortfall) <= atp.freeze_tolerance
        reachable = shortfall <= atp.freeze_tolerance  # on target or past it
        self.steps_within_tolerance = self.steps_within_tolerance + 1 if on_target else 0
        held = self.steps_within_tolerance >= atp.freeze_patience
        # Past the end of control, freeze as soon as the target is reachable, up to a bounded extension.
        ended = self.step >= self.control_steps and (reachable or self.step >= self.control_cap)
        if held or ended:
            masks = self.generator.masks_at_sparsity(self._reachable_sparsity())
            masks = round_mlp_channels(self.space, masks, atp.mlp_channel_multiple, self.generator.logits())
            masks = self.context.broadcast_masks(masks)
            if not self._crossing_is_smooth(masks):
                self.steps_within_tolerance = 0  # an early freeze must hold the target anew
                return
            self.sparsity_at_control_end = self.noise_free_sparsity
            if not reachable:
                log.warning(
                    "control ended at step %d with noise-free sparsity %.4f, %.4f short of the target %.4f "
                    "(tolerance %.4f): freezing at most the tolerance nearer, the run misses its target",
                    self.step, self.noise_free_sparsity, shortfall, target, atp.freeze_tolerance,
                )
            self.frozen_masks = masks
            self.freeze_step = self.step
            self.noise_free_sparsity = self.space.sparsity(masks)
            log.info("mask frozen at step %d: sparsity %.4f", self.step, self.noise_free_sparsity)

    def _track_control_loss(self, loss: float) -> None:
        """Fold one generator step's task loss into the control loss (an EMA over about ten steps)."""
        decay = CONTROL_LOSS_DECAY
        self.control_loss = loss if self.control_loss is None else decay * self.control_loss + (1 - decay) * loss

    def _crossing_is_smooth(self, masks: Masks) -> bool:
        """Whether freezing onto ``masks`` keeps the loss near the generator's recent loss.

        Near the end of control the budget's pull is at its strongest, and the generator may
        cut a unit the model cannot lose (seen at 60% on a file of HPO definitions: a freeze
        onto such a mask doubled the training loss, and LoRA never recovered). So the frozen
        mask's loss on the first calibration batches must be within atp.freeze_loss_ratio of
        the control loss; otherwise control goes on (the generator sees the cost of that cut
        and undoes it) and the check is repeated each step, up to the end of the extension,
        where the run freezes anyway and says so.
        """
        atp = self.config.atp
        if self.control_loss is None or atp.freeze_loss_ratio is None:
            return True
        loss = self._calibration_loss(masks)
        ratio = self.context.broadcast_value(loss / self.control_loss)  # ranks score their own batches
        if ratio <= atp.freeze_loss_ratio:
            log.info("freeze check at step %d: loss %.3f, %.2fx the control loss", self.step, loss, ratio)
            return True
        if self.step >= self.control_cap:
            log.warning(
                "freeze at step %d (end of the control extension) raises the loss to %.3f, %.2fx the control "
                "loss %.3f (atp.freeze_loss_ratio %.2f): the run may not recover",
                self.step, loss, ratio, self.control_loss, atp.freeze_loss_ratio,
            )
            return True
        log.info("freeze postponed at step %d: the mask's loss %.3f is %.2fx the control loss", self.step, loss, ratio)
        return False

    @torch.no_grad()
    def _calibration_loss(self, masks: Masks) -> float:
        """Mean loss of the masked model on the first baseline.calibration_batches calibration batches."""
        was_training = self.model.training
        self.model.eval()
        losses = []
        with self.autocast(), masked(self.model, self.space, masks):
            for batch in self._calibration_batches():
                losses.append(self.model(**batch).loss.float())
        self.model.train(was_training)
        return torch.stack(losses).mean().item()

    def _current_masks(self) -> Masks:
        """The mask the run would end with if it froze now: the frozen one, else the freeze's cut."""
        if self.frozen_masks is not None:
            return self.frozen_masks
        return self.context.broadcast_masks(self.generator.masks_at_sparsity(self._reachable_sparsity()))

    def _reachable_sparsity(self) -> float:
        """The target, or, for a mask short of it, as near as a freeze may cut (freeze_tolerance)."""
        return min(self.config.atp.sparsity, self.noise_free_sparsity + self.config.atp.freeze_tolerance)

    def _params_kept(self, masks: Masks) -> float:
        """Parameters of the whole model that ``masks`` keeps (LoRA not counted)."""
        removed = self.space.prunable_params - float(self.space.kept_params(masks))
        return float(self.dense_params - removed)

    def _held_out(self, masks: Masks) -> dict[str, float]:
        """Held-out loss and perplexity under ``masks``: the same measure as the run's final one."""
        loss = self._evaluate(masks)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    # -- schedules ---------------------------------------------------------------------
    def _lora_lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak over the run."""
        cfg = self.config.train
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _lasso_weight(self) -> float:
        """lambda, rising linearly to lambda x multiplier over the final ramp of the run."""
        atp, steps = self.config.atp, self.config.train.steps
        if self.config.method != "atp":
            return 0.0  # prune-then-tune has no lasso: cut units' LoRA weights are cut with them
        ramp_start = steps * (1 - atp.lasso_ramp_fraction)
        if atp.lasso_ramp_fraction == 0 or self.step < ramp_start:
            return atp.lasso_weight
        progress = (self.step + 1 - ramp_start) / (steps - ramp_start)
        return atp.lasso_weight * (1 + (atp.lasso_final_multiplier - 1) * min(1.0, progress))

    def _noise_seed(self, stream: int) -> int:
        # Mask noise depends only on (seed, step, which draw): identical on every rank and after resume.
        return (self.config.train.seed * 1_000_003 + self.step) * 2 + stream

    # -- logging and checkpoints -------------------------------------------------------
    def _log(self, window: list[dict[str, float]], elapsed: float) -> None:
        if not self.context.is_main:
            return
        row: dict[str, Any] = {"step": self.step, "phase": "control" if self.freeze_step is None else "frozen"}
        for key in dict.fromkeys(k for m in window for k in m):  # eval keys appear on some steps only
            values = [m[key] for m in window if key in m]
            row[key] = sum(values) / len(values)
        row["sparsity"] = window[-1]["sparsity"]  # achieved by the latest hard mask, not an average
        row["noise_free_sparsity"] = window[-1]["noise_free_sparsity"]  # likewise, the latest
        row["elapsed_s"] = round(elapsed, 2)
        with open(self.folder.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _checkpoint(self) -> None:
        """Every rank calls this: a sharded (ZeRO) save is collective; rank 0 writes the rest."""
        state = None
        if self.context.is_main:
            frozen = self.space.masks_to_dict(self.frozen_masks) if self.frozen_masks is not None else {}
            state = {
                "step": self.step,
                **self.strategy.state_dict(),
                "generator": self.generator.state_dict(),
                "generator_optimizer": self.generator_optimizer.state_dict(),
                "steps_within_tolerance": self.steps_within_tolerance,
                "control_loss": self.control_loss,
                "multipliers": self.multipliers.clone(),
                "sparsity_at_control_end": -1.0 if self.sparsity_at_control_end is None else self.sparsity_at_control_end,
                "freeze_step": -1 if self.freeze_step is None else self.freeze_step,
                "frozen_masks": frozen,
                "log_window": self.log_window,
                "rng": torch.get_rng_state(),
            }
            if self.device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        self.checkpoints.save(self.step, state, self.strategy.save_shards)

    # -- save --------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """Write mask, adapter, generator and summary (last, marking the run finished)."""
        masks = self.frozen_masks
        held_out = self._held_out(masks)
        summary = {
            "target_sparsity": self.config.atp.sparsity,
            "sparsity": self.space.sparsity(masks),
            "kept_prunable_params": int(self.space.kept_params(masks)),
            "prunable_params": self.space.prunable_params,
            "freeze_step": self.freeze_step,
            "sparsity_at_control_end": self.sparsity_at_control_end,
            "reached_target": self.config.atp.sparsity - self.sparsity_at_control_end
            <= self.config.atp.freeze_tolerance,
            "steps": self.step,
            "cpu_threads": torch.get_num_threads(),  # what a CPU run's speed depends on
            "world_size": self.context.world_size,  # processes that trained it (Ray Train workers)
            **held_out,
        }
        with self.strategy.whole_params(self.lora_params):  # collective under ZeRO-3
            if self.context.is_main:
                self._save_adapter()
        if self.context.is_main:
            self.folder.write_mask(self.space, {g: m.cpu() for g, m in masks.items()})
            save_file({k: v.contiguous().cpu() for k, v in self.generator.state_dict().items()}, self.folder.generator)
            atomic_write_json(self.folder.summary, summary)
            self.folder.checkpoint.unlink(missing_ok=True)
        return summary

    def _save_adapter(self) -> None:
        partial = self.folder.adapter.with_name("adapter.partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_pretrained(partial)
        shutil.rmtree(self.folder.adapter, ignore_errors=True)
        partial.rename(self.folder.adapter)

    @torch.no_grad()
    def _evaluate(self, masks: Masks) -> float:
        """Mean target-token loss of the masked, tuned model on the first held-out blocks."""
        self.model.eval()
        blocks = self.eval_blocks.head(FINAL_EVAL_BLOCKS)
        with self.autocast(), masked(self.model, self.space, masks):
            return perplexity(self.model, blocks, self.config.train.batch_size).values["loss"]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked, or on 'auto' where the GPU supports it; else a no-op."""
    if not use_bf16(precision, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the step we (re)start from, so no step appears twice."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))
