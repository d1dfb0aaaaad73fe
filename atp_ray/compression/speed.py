"""How fast a causal LM runs: prefill and decode throughput, peak memory, FLOP counts.

Plain torch, for benchmarks, ``atp-ray eval`` and the search's latency objective.
Conventions:
- *Prefill* processes a prompt of ``seq_len`` tokens into a fresh KV cache and computes
  the logits of the last position only (``logits_to_keep=1``), as generate() does.
- *Decode* is greedy single-token steps with the KV cache, after an untimed prefill;
  generate()'s own bookkeeping (logits processors, stopping criteria) is not timed.
- Times are medians over ``repeats`` runs after ``warmup`` untimed runs.
- FLOPs count matrix products (linear layers, attention) with torch's FlopCounterMode;
  attention counts the full query x key product, which bounds causal kernels from above.
- Peak memory on CUDA comes from the allocator's statistics; on the CPU from the
  process's resident-set high-water mark (Linux), which only means something in a
  process that has not already run bigger work: measure in a fresh process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import DynamicCache


def random_tokens(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> Tensor:
    """Random token ids for ``model``, on its device (content does not change the cost)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen)
    return ids.to(next(model.parameters()).device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(measure: Callable[[], float], repeats: int = 3, warmup: int = 1) -> float:
    """Median of the seconds ``measure()`` reports over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        measure()
    return statistics.median(measure() for _ in range(repeats))


def interleaved_seconds(
    measures: Mapping[str, Callable[[], float]], repeats: int = 3, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each named measure, run once per round, round after round.

    Interleaving makes drifting background load hit every measure alike, so ratios of
    same-round samples compare models fairly on a shared machine.
    """
    for _ in range(warmup):
        for measure in measures.values():
            measure()
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            samples[name].append(measure())
    return samples


@torch.inference_mode()
def prefill(model: nn.Module, ids: Tensor) -> tuple[Tensor, DynamicCache]:
    """Run a prompt into a fresh KV cache; returns the last position's logits and the cache."""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    return logits, cache


def prefill_seconds(model: nn.Module, ids: Tensor) -> float:
    """Seconds for one prefill of ``ids``."""
    start = time.perf_counter()
    prefill(model, ids)
    _sync(ids.device)
    return time.perf_counter() - start


@torch.inference_mode()
def decode_seconds(model: nn.Module, ids: Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy decode steps after an (untimed) prefill of ``ids``."""
    logits, cache = prefill(model, ids)
    _sync(ids.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(input_ids=next_ids, cache=cache, use_cache=True).logits
    _sync(ids.device)
    return time.perf_counter() - start


def prefill_throughput(model: nn.Module, batch: int, seq_len: int, repeats: int = 3, warmup: int = 1) -> float:
    """Prompt tokens per second processed by prefill (batch x seq_len tokens per call)."""
    ids = random_tokens(model, batch, seq_len)
    return batch * seq_len / median_seconds(lambda: prefill_seconds(model, ids), repeats, warmup)


def decode_throughput(
    model: nn.Module, batch: int = 1, prompt_len: int = 32, new_tokens: int = 32, repeats: int = 3, warmup: int = 1
) -> float:
    """Generated tokens per second (all sequences of the batch together) in greedy decoding."""
    ids = random_tokens(model, batch, prompt_len)
    return batch * new_tokens / median_seconds(lambda: decode_seconds(model, ids, new_tokens), repeats, warmup)


# -- FLOPs --------------------------------------------------------------------------------
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch has no formula for the CPU flash kernel that sdpa uses; it has the same q/k/v inputs.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


@torch.inference_mode()
def prefill_flops(model: nn.Module, batch: int, seq_len: int) -> int:
    """Matmul FLOPs of one prefill of ``batch`` x ``seq_len`` tokens."""
    ids = random_tokens(model, batch, seq_len)
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        prefill(model, ids)
    return counter.get_total_flops()


@torch.inference_mode()
def decode_flops(model: nn.Module, batch: int, context_len: int) -> int:
    """Matmul FLOPs of one decode step with ``context_len`` tokens already in the cache."""
    _, cache = prefill(model, random_tokens(model, batch, context_len))
    next_ids = random_tokens(model, batch, 1, seed=1)
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        model(input_ids=next_ids, cache=cache, use_cache=True)
    return counter.get_total_flops()


# -- memory -------------------------------------------------------------------------------
_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not found in {_STATUS}")


def memory_in_use(device: torch.device | str = "cpu") -> int:
    """Bytes in use now: CUDA tensors on a GPU; the process's resident set on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_bytes("VmRSS")


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start a new peak-memory window at the current level."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to VmRSS


def peak_memory(device: torch.device | str = "cpu") -> int:
    """Highest bytes in use since the last :func:`reset_peak_memory`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")
