"""One ATP run on one process: setup -> train -> save, read top to bottom.

Each step of the control phase first trains the generator (LLM and LoRA frozen) on a
calibration batch against task loss + ratio loss, then samples a hard mask and trains
LoRA on a training batch against task loss + group lasso. Once the generator's
noise-free mask has held the target sparsity for a while, or the control phase ends,
the mask is frozen and LoRA training continues under it, with the lasso weight raised
over the final steps so the LoRA weights of cut structures reach zero.

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
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from tqdm.auto import tqdm

from atp_ray.config import RunConfig
from atp_ray.data import BatchStream, build_splits
from atp_ray.errors import RunFolderError
from atp_ray.evaluate import perplexity
from atp_ray.generator import PruningGenerator, detach_masks
from atp_ray.losses import lora_group_lasso, ratio_loss
from atp_ray.masking import masked
from atp_ray.modeling import load_model, load_tokenizer
from atp_ray.process import ProcessContext
from atp_ray.run_folder import RunFolder, atomic_write_bytes, atomic_write_json
from atp_ray.structures import Masks, PruningSpace, UnitGroup

log = logging.getLogger(__name__)

# Held-out blocks scored at the end of a run; enough for a stable mean, cheap on CPU.
FINAL_EVAL_BLOCKS = 32


def run_atp(config: RunConfig, run_dir: str | Path, context: ProcessContext | None = None) -> dict[str, Any]:
    """Run (or resume) ATP into ``run_dir``; returns the run summary."""
    recipe = ATPRecipe(config, Path(run_dir), context or ProcessContext.current(config.train.device))
    recipe.setup()
    recipe.train()
    return recipe.save()


class ATPRecipe:
    """The state of one ATP run and its three stages."""

    def __init__(self, config: RunConfig, run_dir: Path, context: ProcessContext):
        self.config = config
        self.folder = RunFolder(run_dir)
        self.context = context
        self.device = context.device
        self.target_kept = 1.0 - config.atp.sparsity
        self.control_steps = max(1, math.ceil(config.train.steps * config.atp.control_fraction))

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

        base = load_model(cfg.model.path, cfg.model.dtype)
        self.space = PruningSpace.from_config(base.config)
        lora = LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, lora).to(self.device)
        self.lora_params = [p for p in self.model.parameters() if p.requires_grad]
        self.generator = PruningGenerator(
            self.space, width=cfg.atp.generator_width, temperature=cfg.atp.temperature, base=cfg.atp.base
        ).to(self.device)

        self.lora_optimizer = torch.optim.AdamW(
            self.lora_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.generator_optimizer = torch.optim.AdamW(self.generator.parameters(), lr=cfg.atp.generator_lr)
        self.lora_scheduler = torch.optim.lr_scheduler.LambdaLR(self.lora_optimizer, self._lora_lr_factor)
        self.autocast = functools.partial(_autocast, cfg.train.precision, self.device)

        self.step = 0
        self.frozen_masks: dict[UnitGroup, torch.Tensor] | None = None
        self.freeze_step: int | None = None
        self.steps_within_tolerance = 0
        self.log_window: list[dict[str, float]] = []  # per-step metrics since the last metrics row
        self._resume()
        if self.context.is_main:
            _truncate_metrics(self.folder.metrics, self.step)

    def _prepare_folder(self) -> None:
        folder = self.folder
        if folder.is_finished():
            raise RunFolderError(f"{folder.root} holds a finished run; choose another --out")
        resolved = self.config.to_dict()
        if folder.config.is_file() and folder.read_config() != resolved:
            raise RunFolderError(
                f"{folder.root} holds a run with a different config; resume it with the same "
                f"config, or choose another --out (saved config: {folder.config})"
            )
        if self.context.is_main:
            folder.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder.config, yaml.safe_dump(resolved, sort_keys=False).encode())

    def _resume(self) -> None:
        state = self.folder.load_checkpoint()
        if state is None:
            return
        set_peft_model_state_dict(self.model, state["lora"])
        self.generator.load_state_dict(state["generator"])
        self.lora_optimizer.load_state_dict(state["lora_optimizer"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.lora_scheduler.load_state_dict(state["lora_scheduler"])
        self.step = state["step"]
        self.steps_within_tolerance = state["steps_within_tolerance"]
        # A checkpoint between two rows carries the steps already taken toward the next row.
        self.log_window = state.get("log_window", [])
        self.freeze_step = state["freeze_step"] if state["freeze_step"] >= 0 else None
        if state["frozen_masks"]:
            self.frozen_masks = {
                g: m.to(self.device) for g, m in self.space.masks_from_dict(state["frozen_masks"]).items()
            }
        torch.set_rng_state(state["rng"])
        log.info("resumed %s at step %d", self.folder.root, self.step)

    # -- train -------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.config.train
        progress = tqdm(
            total=cfg.steps, initial=self.step, desc="ATP", disable=not self.context.is_main, dynamic_ncols=True
        )
        started = time.monotonic()
        while self.step < cfg.steps:
            metrics: dict[str, float] = {}
            if self.frozen_masks is None:
                metrics |= self._generator_step()
            masks = self.frozen_masks if self.frozen_masks is not None else self._sample_masks()
            metrics |= self._lora_step(masks)
            self.step += 1
            if self.frozen_masks is None:
                self._maybe_freeze()
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
        _set_requires_grad(self.lora_params, False)
        noise = torch.Generator(device=self.device).manual_seed(self._noise_seed(0))
        masks = self.generator(noise)
        batch = self._to_device(self.calibration_stream.batch(self.step))
        with self.autocast(), masked(self.model, self.space, masks):
            task_loss = self.model(**batch).loss
        kept = self.space.kept_fraction(masks)
        ratio = ratio_loss(kept, self.target_kept)
        loss = task_loss.float() + self.config.atp.ratio_weight * ratio
        self.generator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.context.average_gradients(self.generator.parameters())
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.config.train.max_grad_norm)
        self.generator_optimizer.step()
        _set_requires_grad(self.lora_params, True)
        return {"generator_loss": task_loss.item(), "ratio_loss": ratio.item()}

    def _sample_masks(self) -> dict[UnitGroup, torch.Tensor]:
        """A noisy hard mask from the generator for one LoRA step, the same on every rank."""
        self.generator.train()
        noise = torch.Generator(device=self.device).manual_seed(self._noise_seed(1))
        with torch.no_grad():
            masks = detach_masks(self.generator(noise))
        return self.context.broadcast_masks(masks)

    def _lora_step(self, masks: Masks) -> dict[str, float]:
        """One LoRA update on a training batch: task loss + weighted group lasso."""
        self.model.train()
        batch = self._to_device(self.train_stream.batch(self.step))
        with self.autocast(), masked(self.model, self.space, masks):
            task_loss = self.model(**batch).loss
        lasso = lora_group_lasso(self.model, self.space, masks)
        lasso_weight = self._lasso_weight()
        loss = task_loss.float() + lasso_weight * lasso
        self.lora_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.context.average_gradients(self.lora_params)
        torch.nn.utils.clip_grad_norm_(self.lora_params, self.config.train.max_grad_norm)
        self.lora_optimizer.step()
        lr = self.lora_scheduler.get_last_lr()[0]
        self.lora_scheduler.step()
        metrics = {
            "loss": task_loss.item(),
            "sparsity": self.space.sparsity(masks),
            "group_lasso": lasso.item(),
            "lasso_weight": lasso_weight,
            "lr": lr,
            "generator_lr": self.generator_optimizer.param_groups[0]["lr"],
        }
        if self.frozen_masks is not None:
            metrics["ratio_loss"] = float(ratio_loss(self.space.kept_fraction(masks), self.target_kept))
        return metrics

    def _maybe_freeze(self) -> None:
        """Freeze the mask at the end of control, or early once the generator holds the target."""
        target = self.config.atp.sparsity
        gap = abs(self.space.sparsity(self.generator.deterministic_masks()) - target)
        self.steps_within_tolerance = self.steps_within_tolerance + 1 if gap <= self.config.atp.freeze_tolerance else 0
        if self.steps_within_tolerance >= self.config.atp.freeze_patience or self.step >= self.control_steps:
            masks = self.generator.masks_at_sparsity(target)
            self.frozen_masks = self.context.broadcast_masks(masks)
            self.freeze_step = self.step
            log.info("mask frozen at step %d: sparsity %.4f", self.step, self.space.sparsity(masks))

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
        for key in window[-1]:
            values = [m[key] for m in window if key in m]
            row[key] = sum(values) / len(values)
        row["sparsity"] = window[-1]["sparsity"]  # achieved by the latest hard mask, not an average
        row["elapsed_s"] = round(elapsed, 2)
        with open(self.folder.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _checkpoint(self) -> None:
        if not self.context.is_main:
            return
        frozen = self.space.masks_to_dict(self.frozen_masks) if self.frozen_masks is not None else {}
        self.folder.save_checkpoint(
            {
                "step": self.step,
                "lora": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.model).items()},
                "generator": self.generator.state_dict(),
                "lora_optimizer": self.lora_optimizer.state_dict(),
                "generator_optimizer": self.generator_optimizer.state_dict(),
                "lora_scheduler": self.lora_scheduler.state_dict(),
                "steps_within_tolerance": self.steps_within_tolerance,
                "freeze_step": -1 if self.freeze_step is None else self.freeze_step,
                "frozen_masks": frozen,
                "log_window": self.log_window,
                "rng": torch.get_rng_state(),
            }
        )

    # -- save --------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """Write mask, adapter, generator and summary (last, marking the run finished)."""
        masks = self.frozen_masks
        eval_loss = self._evaluate(masks)
        summary = {
            "target_sparsity": self.config.atp.sparsity,
            "sparsity": self.space.sparsity(masks),
            "kept_prunable_params": int(self.space.kept_params(masks)),
            "prunable_params": self.space.prunable_params,
            "freeze_step": self.freeze_step,
            "steps": self.step,
            "eval_loss": eval_loss,
            "eval_perplexity": math.exp(min(eval_loss, 50.0)),
        }
        if self.context.is_main:
            self.folder.write_mask(self.space, {g: m.cpu() for g, m in masks.items()})
            self._save_adapter()
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


def _set_requires_grad(params: list[torch.nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked, or on 'auto' where the GPU supports it; else a no-op."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the step we (re)start from, so no step appears twice."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))
