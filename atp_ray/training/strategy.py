"""The run config's strategy for this process: ``distributed.strategy`` and the settings it reads.

The strategies themselves, and the registry of their names, are :mod:`atp_ray.runtime.strategies`;
this is where the run config meets them (it reads the config, they take plain arguments).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atp_ray.config import RunConfig
from atp_ray.runtime.process import ProcessContext
from atp_ray.runtime.strategies import Strategy, deepspeed_config, make_strategy


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 when asked, or on 'auto' where the GPU supports it."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def strategy_from_config(config: RunConfig, context: ProcessContext) -> Strategy:
    """The strategy ``config.distributed.strategy`` names, set up for this process."""
    dist, train = config.distributed, config.train
    override = None
    if dist.deepspeed_config:
        override = json.loads(Path(dist.deepspeed_config).expanduser().read_text())
    ds_config = deepspeed_config(
        micro_batch_size=train.batch_size,
        accumulation_steps=dist.gradient_accumulation_steps,
        max_grad_norm=train.max_grad_norm,
        bf16=use_bf16(train.precision, context.device),
        offload_optimizer=dist.offload_optimizer,
        offload_params=dist.offload_params,
        override=override,
    )
    return make_strategy(
        dist.strategy,
        context,
        max_grad_norm=train.max_grad_norm,
        accumulation_steps=dist.gradient_accumulation_steps,
        ds_config=ds_config,
    )
