"""The strategy registry and the DeepSpeed config built from our YAML (no DeepSpeed engine started)."""

import pytest
import torch

from atp_ray.errors import ATPRayError
from atp_ray.runtime.process import ProcessContext
from atp_ray.runtime.strategies import STRATEGIES, deepspeed_config, make_strategy


def test_deepspeed_config_from_our_fields_with_a_user_override():
    config = deepspeed_config(
        micro_batch_size=4,
        accumulation_steps=2,
        max_grad_norm=0.5,
        bf16=True,
        offload_optimizer=True,
        override={"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0},
    )
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert "train_batch_size" not in config  # DeepSpeed derives it from the world size it sees
    assert config["bf16"] == {"enabled": True}
    assert config["gradient_clipping"] == 2.0  # the user's JSON wins
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["reduce_bucket_size"] == 1000  # merged, not replaced


def test_registry_names_the_config_strategies():
    assert set(STRATEGIES) == {"ddp", "zero2", "zero3"}
    context = ProcessContext(torch.device("cpu"))
    zero3 = make_strategy("zero3", context, ds_config=deepspeed_config(
        micro_batch_size=1, accumulation_steps=1, max_grad_norm=1.0, bf16=True
    ))
    assert zero3.ds_config["zero_optimization"]["stage"] == 3 and zero3.owns_bf16
    assert not make_strategy("ddp", context).owns_bf16
    with pytest.raises(ATPRayError, match="unknown strategy 'fsdp'"):
        make_strategy("fsdp", context)
