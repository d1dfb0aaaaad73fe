"""How the LoRA side of an ATP run is built, stepped and saved: plain data parallel or DeepSpeed ZeRO.

The recipe (``atp_ray.training.atp``) meets a strategy at five seams and nowhere else:

* ``build_model``   the frozen base model with LoRA; ZeRO-3 builds it partitioned
                    (``HfDeepSpeedConfig`` makes transformers load under ``zero.Init``),
                    so no rank ever holds a whole copy on its device;
* ``prepare``       wraps model, LoRA optimizer and scheduler (the DeepSpeed engine);
* ``backward`` / ``step``  one LoRA update: under DeepSpeed ``p.grad`` is empty, the
                    engine averages, clips and steps the optimizer and the scheduler;
* ``whole_params``  a context in which LoRA weights are whole tensors (group lasso, save);
* ``gathered``      a context in which any weights are whole, released on exit (importance
                    scores read the base model one decoder layer at a time through it);
* ``state_dict`` / ``save_shards`` / ``load``  LoRA weights, optimizer and scheduler state.

A strategy also says whether it owns bf16 (``owns_bf16``): the DeepSpeed engine casts the
model itself, and autocast on top of it would be a second owner.

The generator never enters a strategy: it is a few hundred thousand parameters, replicated
on every rank, and its gradients come from ``torch.autograd.grad`` (which touches no
parameter the engine owns) and are all-reduced by ``ProcessContext``. Putting it into the
engine would need a second engine (one engine trains one optimizer), buy no memory, and
tie its step to the LoRA step's gradient accumulation.

This module is the registry of strategies (:data:`STRATEGIES`): the run config's
``distributed.strategy``, the CLI's ``--strategy`` and the docs take their names from it, and
the run config's choice becomes a strategy in :mod:`atp_ray.training.strategy`. Adding one is a class
here with ``@register(name)``, and its test.

No DeepSpeed or peft import at module level: both are imported where a strategy uses them,
so this module loads wherever torch does (the run config reads the registry).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from atp_ray.errors import ATPRayError
from atp_ray.runtime.process import ProcessContext

if TYPE_CHECKING:
    from peft import LoraConfig

log = logging.getLogger(__name__)

STRATEGIES: dict[str, type[Strategy]] = {}
# Large enough that DeepSpeed never prints on its own; our metrics.jsonl is the log.
_NEVER = 10**9


class Strategy(Protocol):
    """The seams through which the recipe builds, steps and saves the LoRA model."""

    summary: ClassVar[str]  # one line for ``--strategy``'s help and the docs
    requires: ClassVar[str | None]  # a package it needs beyond torch, checked before a run starts
    owns_bf16: bool

    def build_model(self, load_base: Callable[[], nn.Module], lora: LoraConfig) -> nn.Module: ...

    def prepare(
        self, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def whole_params(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager: ...

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager: ...

    def state_dict(self) -> dict[str, Any]: ...

    def save_shards(self, directory: Path | None) -> None: ...

    def load(self, state: dict[str, Any], directory: Path | None) -> None: ...


def register(name: str) -> Callable[[type], type]:
    """Class decorator: the strategy ``distributed.strategy: name`` selects."""

    def add(cls: type) -> type:
        STRATEGIES[name] = cls
        return cls

    return add


def make_strategy(name: str, context: ProcessContext, **options: Any) -> Strategy:
    """The strategy registered as ``name`` (``distributed.strategy``) for this process."""
    if name not in STRATEGIES:
        raise ATPRayError(f"distributed.strategy: unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")
    return STRATEGIES[name](context, **options)


@register("ddp")
class DataParallel:
    """Every rank holds the whole model; LoRA gradients are averaged in one flat all-reduce.

    One process is the special case world_size = 1 (the all-reduce is skipped). The LoRA
    gradients are few and small, so one bucket replaces torch DDP's machinery (which would
    also have to learn to skip the generator step's autograd.grad pass).
    """

    summary = "whole model per worker"
    requires = None
    owns_bf16 = False

    def __init__(self, context: ProcessContext, *, max_grad_norm: float = 1.0, accumulation_steps: int = 1, **_: Any):
        self.context = context
        self.max_grad_norm = max_grad_norm
        self.accumulation_steps = accumulation_steps

    def build_model(self, load_base: Callable[[], nn.Module], lora: LoraConfig) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(load_base(), lora).to(self.context.device)

    def prepare(
        self, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> None:
        self.model, self.params, self.optimizer, self.scheduler = model, params, optimizer, scheduler
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def step(self) -> None:
        self.context.average_gradients(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def whole_params(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        return {
            "lora": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.model).items()},
            "lora_optimizer": self.optimizer.state_dict(),
            "lora_scheduler": self.scheduler.state_dict(),
        }

    def save_shards(self, directory: Path | None) -> None:
        return None  # everything is in state_dict()

    def load(self, state: dict[str, Any], directory: Path | None) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state["lora"])
        self.optimizer.load_state_dict(state["lora_optimizer"])
        self.scheduler.load_state_dict(state["lora_scheduler"])


class DeepSpeedZero:
    """LoRA trained by a DeepSpeed engine with ZeRO stage ``stage`` (2 or 3).

    ``ds_config`` is the DeepSpeed JSON built by :func:`deepspeed_config` (with any user
    override merged in). The engine owns gradient averaging, clipping, accumulation, the
    scheduler's step and, when enabled in the config, bf16.
    """

    stage: int
    requires = "deepspeed"

    def __init__(self, context: ProcessContext, *, ds_config: dict[str, Any], **_: Any):
        self.context = context
        self.ds_config = copy.deepcopy(ds_config)
        self.ds_config.setdefault("zero_optimization", {})["stage"] = self.stage
        self.owns_bf16 = bool(self.ds_config.get("bf16", {}).get("enabled", False))

    def build_model(self, load_base: Callable[[], nn.Module], lora: LoraConfig) -> nn.Module:
        from peft import get_peft_model

        _init_deepspeed_comm()
        # On the device before the engine exists: importance scores run on it before prepare.
        return get_peft_model(load_base(), lora).to(self.context.device)

    def prepare(
        self, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> None:
        import deepspeed

        self.model, self.params = model, params
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self) -> None:
        self.engine.step()  # a no-op between accumulation boundaries

    def whole_params(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # ZeRO-2 keeps every weight whole on every rank

    def state_dict(self) -> dict[str, Any]:
        return {}  # weights, optimizer and scheduler live in the engine's shards

    def save_shards(self, directory: Path | None) -> None:
        if directory is None:
            raise ATPRayError("DeepSpeed checkpoints are sharded: this run needs a checkpoint directory (Ray Train)")
        # Collective: every rank writes its own optimizer shard; frozen base weights are skipped.
        self.engine.save_checkpoint(str(directory), tag="lora", exclude_frozen_parameters=True)

    def load(self, state: dict[str, Any], directory: Path | None) -> None:
        if directory is None:
            raise ATPRayError("DeepSpeed checkpoints are sharded: this run needs a checkpoint directory (Ray Train)")
        load_path, _ = self.engine.load_checkpoint(
            str(directory), tag="lora", load_module_strict=False, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ATPRayError(f"{directory}: no DeepSpeed checkpoint found")


@register("zero2")
class Zero2(DeepSpeedZero):
    """ZeRO-2: optimizer state and gradients sharded; every rank holds the whole (frozen) model."""

    summary = "DeepSpeed ZeRO-2"
    stage = 2


@register("zero3")
class Zero3(DeepSpeedZero):
    """ZeRO-3: the frozen base weights are sharded too; LoRA weights are read whole.

    The group lasso reads rows and columns of every LoRA matrix in every step, with
    gradients, outside any module's forward (where ZeRO-3 would gather them). DeepSpeed
    keeps a parameter whole on every rank when it has fewer elements than
    ``stage3_param_persistence_threshold``; we raise that threshold above the largest LoRA
    matrix. That alone was not enough here (LoRA, added by peft after ``zero.Init``, was
    found partitioned after setup and after a checkpoint load), so ``whole_params``, which
    the recipe wraps around the lasso and the adapter save, gathers any LoRA weight found
    partitioned. LoRA is tiny next to the base, so gathering it costs little.
    """

    summary = "DeepSpeed ZeRO-3, base weights sharded too"
    stage = 3

    def build_model(self, load_base: Callable[[], nn.Module], lora: LoraConfig) -> nn.Module:
        from peft import get_peft_model
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        _init_deepspeed_comm()  # zero.Init partitions over the process group while loading
        # Held while loading only: transformers then builds each layer under zero.Init. Held
        # longer, every later from_pretrained in this process (compressing the finished run,
        # say) would load partitioned, empty weights.
        hf_config = HfDeepSpeedConfig(self.ds_config)
        try:
            model = get_peft_model(load_base(), lora)
        finally:
            del hf_config
            unset_hf_deepspeed_config()
        largest = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
        zero = self.ds_config["zero_optimization"]
        if zero.get("stage3_param_persistence_threshold", 100_000) <= largest:
            zero["stage3_param_persistence_threshold"] = largest + 1
            log.info("ZeRO-3: persistence threshold raised to %d so LoRA matrices stay whole", largest + 1)
        return model

    @contextlib.contextmanager
    def whole_params(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Gather any LoRA weight found partitioned; ZeRO-3 partitions it again when it releases it.

        Every rank is in the same state, so every rank makes the same (collective) gather
        call or none.
        """
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        missing = [p for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
        if missing:
            missing[0].all_gather(param_list=missing)
        yield

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        """Whole inside the block, partitioned again on exit: for reading weights outside the engine.

        Collective: every rank must open it for the same parameters in the same order.
        """
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)


def _init_deepspeed_comm() -> None:
    """DeepSpeed's view of the process group the launcher (Ray Train) already initialised."""
    import deepspeed

    deepspeed.init_distributed()


def deepspeed_config(
    *,
    micro_batch_size: int,
    accumulation_steps: int,
    max_grad_norm: float,
    bf16: bool,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    override: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON of a run, from our YAML, with a user's own JSON merged over it."""
    zero: dict[str, Any] = {}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # Our client optimizer is torch's AdamW: DeepSpeed's fused Adam would JIT-compile.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    return _merge(config, override or {})


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged

