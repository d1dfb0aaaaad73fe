"""One run on one process: setup -> train -> save, read top to bottom.

Every step tunes LoRA on a training batch, under a mask from the run's mask source
(atp_ray.training.mask_sources: ATP's generator, a two-step baseline's scored mask, or none),
against task loss + group lasso (+ distillation). An ATP run's mask is learned in a
control phase and then frozen; LoRA training continues under it, with the lasso weight
raised over the final steps so the LoRA weights of cut structures reach zero.

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
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tqdm.auto import tqdm

from atp_ray.config import RunConfig
from atp_ray.data.batches import BatchStream, build_splits
from atp_ray.errors import ConfigError
from atp_ray.evaluation.evaluate import perplexity
from atp_ray.pruning.losses import lora_group_lasso, ratio_loss
from atp_ray.pruning.masking import masked
from atp_ray.pruning.structures import Masks, PruningSpace
from atp_ray.runtime.modeling import enable_activation_checkpointing, load_model, load_tokenizer, teacher_adapter
from atp_ray.runtime.process import CheckpointStore, FolderCheckpoints, ProcessContext
from atp_ray.runtime.run_folder import RunFolder, atomic_write_bytes, atomic_write_json, budget_key
from atp_ray.training.distillation import TopLogits, attach_tuned_teacher, distillation_loss, teacher_logits
from atp_ray.training.elastic import ElasticMasks
from atp_ray.training.mask_sources import MASK_SOURCES, Workbench
from atp_ray.training.memory_plan import GIB, ModelShape, resolve_checkpointing
from atp_ray.training.strategy import strategy_from_config, use_bf16
from atp_ray.training.teacher_cache import TeacherCache, drawn_blocks, write_teacher_cache

log = logging.getLogger(__name__)

# Held-out blocks scored at the end of a run; enough for a stable mean, cheap on CPU.
FINAL_EVAL_BLOCKS = 32


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
    """The state of one run and its three stages."""

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
        load_base = functools.partial(load_model, cfg.model.path, cfg.model.dtype)
        self.model = self.strategy.build_model(load_base, _lora_config(cfg))
        self.teacher_cache = None
        if cfg.distill.weight > 0 and cfg.distill.cache is not None:
            self.teacher_cache = TeacherCache(Path(cfg.distill.cache), cfg)
        elif cfg.distill.weight > 0 and cfg.distill.teacher == "tuned":  # frozen: before the trained params are listed
            attach_tuned_teacher(self.model, teacher_adapter(cfg.distill.teacher_run, cfg.model.path))
        self.space = PruningSpace.from_config(self.model.config)
        self.checkpointing = self._wants_checkpointing()
        if self.checkpointing:
            enable_activation_checkpointing(self.model)
        # bf16 has one owner: the strategy's engine when it casts the model, else autocast here.
        precision = "fp32" if self.strategy.owns_bf16 else cfg.train.precision
        self.autocast = functools.partial(_autocast, precision, self.device)
        bench = Workbench(self.model, self.space, self.context, self.autocast, self.calibration_stream,
                          cfg.baseline.calibration_batches, self.strategy.gathered)  # fmt: skip
        # A source scores units on the untuned model as it is built: before the engine casts the
        # model, so under train.precision's autocast.
        source_class = ElasticMasks if cfg.atp.elastic else MASK_SOURCES[cfg.method]
        with _autocast(cfg.train.precision, self.device):
            self.source = source_class(cfg, bench)
        self.lora_params = [p for p in self.model.parameters() if p.requires_grad]
        # Base parameters, LoRA excluded (ZeRO-3 keeps a shard per rank; ds_numel is the whole).
        self.dense_params = sum(
            getattr(p, "ds_numel", p.numel()) for n, p in self.model.named_parameters() if "lora_" not in n
        )

        self.lora_optimizer = torch.optim.AdamW(
            self.lora_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.lora_scheduler = torch.optim.lr_scheduler.LambdaLR(self.lora_optimizer, self._lora_lr_factor)
        self.strategy.prepare(self.model, self.lora_params, self.lora_optimizer, self.lora_scheduler)

        self.step = 0
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
        self.source.load_state_dict(state["source"])
        self.step = state["step"]
        # A checkpoint between two rows carries the steps already taken toward the next row.
        self.log_window = state["log_window"]
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
            masks, metrics = self.source.step(self.step, self._lora_step)
            self.step += 1
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                metrics |= self._periodic_eval()
            if self.on_step is not None:
                self.on_step(self.step, masks, metrics)
            self.source.after_step(self.step)
            metrics["noise_free_sparsity"] = self.source.noise_free_sparsity
            self.log_window.append(metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", sparsity=f"{metrics['sparsity']:.3f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(self.log_window, time.monotonic() - started)
                self.log_window = []
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self._checkpoint()
        progress.close()

    def _lora_step(self, masks: Masks) -> dict[str, float]:
        """One LoRA update on a training batch: task loss + weighted group lasso (+ weighted distillation)."""
        self.model.train()
        lasso_weight = self._lasso_weight()
        distill = self.config.distill
        lr = self.lora_scheduler.get_last_lr()[0]
        accumulation = self.config.distributed.gradient_accumulation_steps
        distilling = distill.weight > 0 and (self.source.freeze_step is not None or not distill.after_freeze)
        task_losses, distill_losses = [], []
        for micro in range(accumulation):
            batch = self._to_device(self.train_stream.batch(self.step * accumulation + micro))
            teacher = self._teacher(batch) if distilling else None
            # Backward inside the mask's context: activation checkpointing recomputes layers there.
            with masked(self.model, self.space, masks):
                with self.autocast():
                    output = self.model(**batch)
                task_loss = output.loss
                # LoRA weights are whole on every rank (ZeRO-3 keeps them unpartitioned), so
                # the lasso reads the same rows and columns as on one process.
                with self.strategy.whole_params(self.lora_params):
                    lasso = lora_group_lasso(self.model, self.space, self.source.lasso_masks(masks))
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
            "generator_lr": self.config.atp.generator_lr,  # constant: the generator's optimizer has no schedule
            "params": self._params_kept(masks),
        }
        if self.source.freeze_step is not None:  # how far the frozen mask is from its budget
            metrics["ratio_loss"] = float(ratio_loss(self.space.kept_fraction(masks), 1.0 - self.source.step_target))
        if distill_losses:
            metrics["distill"] = sum(distill_losses) / accumulation  # the KL before its weight
        return metrics

    def _teacher(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | TopLogits:
        """The distillation teacher's logits on ``batch``: read from ``distill.cache``, else its forward."""
        if self.teacher_cache is not None:
            return self.teacher_cache.top_logits(batch["input_ids"])
        # Before the mask's context: the teacher is the unmasked model. Every rank runs it
        # (under ZeRO-3 its forward gathers the same shards as the student's).
        with self.autocast():
            return teacher_logits(self.model, batch, self.config.distill.teacher)

    def _params_kept(self, masks: Masks) -> float:
        """Parameters of the whole model that ``masks`` keeps (LoRA not counted)."""
        removed = self.space.prunable_params - float(self.space.kept_params(masks))
        return float(self.dense_params - removed)

    def _periodic_eval(self) -> dict[str, float]:
        """Held-out quality now; an elastic run's at each budget, keyed ``eval_perplexity@0.2`` and so on."""
        if not self.config.atp.elastic:
            return self._held_out(self.source.current_masks())
        metrics = {}
        for budget, masks in self.source.current_budget_masks().items():
            key = budget_key(budget)
            metrics |= {f"{name}@{key}": value for name, value in self._held_out(masks).items()}
            metrics[f"params@{key}"] = self._params_kept(masks)
        return metrics

    def _held_out(self, masks: Masks) -> dict[str, float]:
        """Held-out loss and perplexity under ``masks``: the same measure as the run's final one."""
        loss = self._evaluate(masks)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    # -- schedules ---------------------------------------------------------------------
    def _lora_lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak over the run (or, with
        ``lr_after_freeze: restart``, over the control phase and again over the frozen one)."""
        cfg = self.config.train
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        start = cfg.warmup_steps
        freeze_step = self.source.freeze_step
        # The scheduler sets step freeze_step's rate before the mask freezes: restart at the next.
        if cfg.lr_after_freeze == "restart" and freeze_step is not None and step > freeze_step > start:
            start = freeze_step + 1
        progress = (step - start) / max(1, cfg.steps - start)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _lasso_weight(self) -> float:
        """lambda, rising linearly to lambda x multiplier over the final ramp of the run."""
        atp, steps = self.config.atp, self.config.train.steps
        if not self.source.trains_generator:
            return 0.0  # a mask fixed from step 0 has no lasso: cut units' LoRA weights are cut with them
        ramp_start = steps * (1 - atp.lasso_ramp_fraction)
        if atp.lasso_ramp_fraction == 0 or self.step < ramp_start:
            return atp.lasso_weight
        progress = (self.step + 1 - ramp_start) / (steps - ramp_start)
        return atp.lasso_weight * (1 + (atp.lasso_final_multiplier - 1) * min(1.0, progress))

    # -- logging and checkpoints -------------------------------------------------------
    def _log(self, window: list[dict[str, float]], elapsed: float) -> None:
        if not self.context.is_main:
            return
        phase = "control" if self.source.freeze_step is None else "frozen"
        row: dict[str, Any] = {"step": self.step, "phase": phase}
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
            state = {
                "step": self.step,
                **self.strategy.state_dict(),
                "source": self.source.state_dict(),
                "log_window": self.log_window,
                "rng": torch.get_rng_state(),
            }
            if self.device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        self.checkpoints.save(self.step, state, self.strategy.save_shards)

    # -- save --------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """Write mask, adapter, generator and summary (last, marking the run finished)."""
        source, atp = self.source, self.config.atp
        final = source.final_masks()
        control_end = source.sparsities_at_control_end()
        outcomes = {budget: self._outcome(budget, masks, control_end[budget]) for budget, masks in final.items()}
        run = {
            "prunable_params": self.space.prunable_params,
            "freeze_step": source.freeze_step,
            "steps": self.step,
            "cpu_threads": torch.get_num_threads(),  # what a CPU run's speed depends on
            "world_size": self.context.world_size,  # processes that trained it (Ray Train workers)
        }
        if atp.elastic:
            budgets = {budget_key(b): o | {"params": self._params_kept(final[b])} for b, o in outcomes.items()}
            summary = {"target_sparsities": list(atp.budgets), "budgets": budgets, **run}
        else:
            summary = {**outcomes[atp.sparsity], **run}
        with self.strategy.whole_params(self.lora_params):  # collective under ZeRO-3
            if self.context.is_main:
                self._save_adapter()
        if self.context.is_main:
            cpu_masks = {budget: {g: m.cpu() for g, m in masks.items()} for budget, masks in final.items()}
            if atp.elastic:
                self.folder.write_budget_masks(self.space, cpu_masks)
            else:
                self.folder.write_mask(self.space, cpu_masks[atp.sparsity])
            generator = source.generator.state_dict()
            save_file({k: v.contiguous().cpu() for k, v in generator.items()}, self.folder.generator)
            atomic_write_json(self.folder.summary, summary)
            self.folder.checkpoint.unlink(missing_ok=True)
        return summary

    def _outcome(self, target: float, masks: Masks, control_end: float) -> dict[str, Any]:
        """What the run made of one sparsity budget: the frozen mask's size and held-out quality."""
        return {
            "target_sparsity": target,
            "sparsity": self.space.sparsity(masks),
            "kept_prunable_params": int(self.space.kept_params(masks)),
            "sparsity_at_control_end": control_end,
            "reached_target": target - control_end <= self.config.atp.freeze_tolerance,
            **self._held_out(masks),
        }

    def _save_adapter(self) -> None:
        partial = self.folder.adapter.with_name("adapter.partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_pretrained(partial, selected_adapters=["default"])  # not a tuned teacher's
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


def build_teacher_cache(config: RunConfig, path: Path, progress: bool = True) -> int:
    """Write ``config``'s teacher's top-k logits on every training block its run draws to ``path``.

    What ``atp-ray distill-cache`` runs: one process, the model built as a run builds it, the
    teacher's forward under the run's precision. Returns the number of blocks cached.
    """
    if not config.distill.cacheable:
        raise ConfigError(["a teacher cache needs distill.teacher dense or tuned and distill.top_k set"])
    context = ProcessContext.current(config.train.device)
    splits = build_splits(config.data, load_tokenizer(config.model.path), config.train.seed)
    model = get_peft_model(load_model(config.model.path, config.model.dtype), _lora_config(config)).to(context.device)
    if config.distill.teacher == "tuned":
        attach_tuned_teacher(model, teacher_adapter(config.distill.teacher_run, config.model.path))
    blocks = drawn_blocks(config, splits.train)
    with _autocast(config.train.precision, context.device):
        return write_teacher_cache(config, model, blocks, path, config.train.batch_size, progress)


def _lora_config(config: RunConfig) -> LoraConfig:
    lora = config.lora
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


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
