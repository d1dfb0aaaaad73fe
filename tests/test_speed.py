"""Speed helpers: shapes of their results and FLOP accounting; never wall-clock values."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model, random_masks

from atp_ray.compression import speed
from atp_ray.compression.compress import compress_model
from atp_ray.pruning.structures import PruningSpace


def test_throughputs_are_positive_rates():
    model = make_tiny_model("llama-gqa")
    assert speed.prefill_throughput(model, batch=2, seq_len=8, repeats=2, warmup=1) > 0
    assert speed.decode_throughput(model, batch=2, prompt_len=4, new_tokens=3, repeats=1, warmup=0) > 0


def test_median_and_interleaving_call_each_measure_in_rounds():
    calls = []

    def measure(name, value):
        def run():
            calls.append(name)
            return value

        return run

    assert speed.median_seconds(measure("a", 2.0), repeats=3, warmup=2) == 2.0
    calls.clear()
    samples = speed.interleaved_seconds({"a": measure("a", 1.0), "b": measure("b", 3.0)}, repeats=2, warmup=1)
    assert samples == {"a": [1.0, 1.0], "b": [3.0, 3.0]}
    assert calls == ["a", "b"] * 3


def expected_prefill_flops(model, batch: int, seq: int) -> int:
    """Linears at 2 x in x out per token (lm_head: last position only), attention at 4 x s^2 x d per head."""
    flops = 2 * batch * model.lm_head.in_features * model.lm_head.out_features
    for layer in model.model.layers:
        attn = layer.self_attn
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                   layer.mlp.down_proj]
        flops += 2 * batch * seq * sum(m.in_features * m.out_features for m in linears)
        flops += 4 * batch * (attn.q_proj.out_features // attn.head_dim) * seq * seq * attn.head_dim
    return flops


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-mha"])
def test_prefill_flops_of_dense_and_compressed_models(name):
    model = make_tiny_model(name)
    space = PruningSpace.from_config(model.config)
    small = copy.deepcopy(model)
    compress_model(small, space, random_masks(space, seed=1, keep=0.5), source_model="tiny")
    for m in (model, small):
        assert speed.prefill_flops(m, batch=2, seq_len=8) == expected_prefill_flops(m, batch=2, seq=8)
    assert speed.decode_flops(small, batch=1, context_len=8) < speed.decode_flops(model, batch=1, context_len=8)


# Run in a process of its own: in a long test session the resident set holds freed heap memory
# that can serve a 64 MiB allocation without raising the high-water mark (seen on a fresh
# machine: peak == before at 1.78 GB resident). That is a true peak (no more memory was
# needed), but not the allocation this test must see.
PEAK_SCRIPT = """
import torch
from atp_ray.compression import speed
before = speed.memory_in_use()
speed.reset_peak_memory()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
del block  # a peak outlives what made it
print(before, speed.peak_memory(), speed.memory_in_use())
"""


def test_peak_memory_sees_a_large_allocation():
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, peak, after = map(int, done.stdout.split())
    assert before > 0
    assert peak - before >= 60 * 2**20
    assert peak - after >= 60 * 2**20  # freed: in use again drops, the peak does not
