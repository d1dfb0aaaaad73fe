"""What a search optimises: the objective registry and how each objective is measured.

Plain torch (no Ray), shared by :func:`atp_ray.search.trial.run_trial` and the search layer.
Every objective has a *final* value, measured on the trial's compressed model, and an
*intermediate* value reported while the trial trains (Tune checks that every report
carries every objective):

=========== ==== ============================================================ =====================================
name        mode final value                                                  intermediate value
=========== ==== ============================================================ =====================================
quality     min  held-out perplexity on the run's own eval split (the first   the same measure under the mask the
                 ``FINAL_EVAL_BLOCKS`` blocks): summary.json's                 run would freeze now, every
                 ``eval_perplexity``, ``atp-ray eval --tasks domain-ppl``      ``train.eval_every`` steps
params      min  exact parameter count of the compressed model                parameters the current mask keeps
latency     min  prefill of a 256-token prompt at batch 1, ms (median of 3)   dense latency x kept-parameter share
throughput  max  greedy decode tokens/s at batch 1 (median of 3)              dense throughput / kept share
flops       min  matmul FLOPs of one 128-token prefill (deterministic)        dense FLOPs x kept-parameter share
accuracy    max  a task's accuracy (``task:`` a built-in or a task YAML)      0 (known only at the end)
=========== ==== ============================================================ =====================================

Speed measurements are noisy on shared machines; ``flops`` ranks by compute and never
changes between runs. The intermediate speed figures are estimates from the dense model's
measurement (taken once per trial) so that early stopping can compare trials mid-run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Mode = Literal["min", "max"]

# Tokens in the prompt whose prefill FLOPs the ``flops`` objective counts.
FLOPS_TOKENS = 128
# Rows of a task scored for the ``accuracy`` objective unless the space says otherwise.
ACCURACY_SAMPLES = 100


@dataclass(frozen=True)
class ObjectiveKind:
    """One entry of the registry: its default direction and what it measures."""

    name: str
    mode: Mode
    description: str
    speed: bool = False  # intermediate value scaled from a dense-model reference
    final_only: bool = False  # no meaningful intermediate value


OBJECTIVES: dict[str, ObjectiveKind] = {
    k.name: k
    for k in (
        ObjectiveKind("quality", "min", "held-out perplexity of the compressed model on the run's own eval split"),
        ObjectiveKind("params", "min", "exact parameter count of the compressed model"),
        ObjectiveKind("latency", "min", "prefill latency of a 256-token prompt at batch 1 (ms)", speed=True),
        ObjectiveKind("throughput", "max", "greedy decode speed at batch 1 (tokens/s)", speed=True),
        ObjectiveKind("flops", "min", f"matmul FLOPs of one {FLOPS_TOKENS}-token prefill", speed=True),
        ObjectiveKind("accuracy", "max", "accuracy on an evaluation task (give task:)", final_only=True),
    )
}


@dataclass(frozen=True)
class Objective:
    """An objective as a search space asks for it."""

    name: str
    mode: Mode
    task: str | None = None  # accuracy only: built-in task name or task YAML path
    max_samples: int = ACCURACY_SAMPLES

    @property
    def kind(self) -> ObjectiveKind:
        return OBJECTIVES[self.name]


# -- final values -------------------------------------------------------------------------------


def final_objectives(
    compressed: Path,
    objectives: list[Objective],
    eval_blocks: int,
    batch_size: int,
    device: str,
    dtype: str = "float32",
) -> dict[str, float]:
    """Measure every objective on a compressed model folder, loaded in ``dtype`` on ``device``."""
    from atp_ray.compress import read_record

    names = {o.name for o in objectives}
    values: dict[str, float] = {}
    if "quality" in names:
        values["quality"] = _task_value(compressed, "domain-ppl", "perplexity", eval_blocks, batch_size, device, dtype)
    if "params" in names:
        values["params"] = float(read_record(compressed).params)
    values |= {k: v for k, v in _speed(compressed, names, device, dtype).items() if k in names}
    for o in objectives:
        if o.name == "accuracy":
            values["accuracy"] = _task_value(compressed, o.task, "accuracy", o.max_samples, batch_size, device, dtype)
    return values


def _task_value(
    model: Path | str, task: str, metric: str, samples: int, batch_size: int, device: str, dtype: str
) -> float:
    """One metric of one task, scored by ``atp-ray eval``'s own recipe."""
    from atp_ray.eval_recipe import run_eval

    report = run_eval(str(model), [task], max_samples=samples, batch_size=batch_size, dtype=dtype, device=device)
    (result,) = report["tasks"].values()
    return float(result["values"][metric])


def _speed(model: Path | str, names: set[str], device: str, dtype: str = "float32") -> dict[str, float]:
    """latency / throughput / flops of a model (compressed folder or dense model path)."""
    values: dict[str, float] = {}
    if names & {"latency", "throughput"}:
        from atp_ray.eval_recipe import run_eval

        report = run_eval(str(model), ["latency"], max_samples=None, dtype=dtype, device=device)
        measured = report["tasks"]["latency"]["values"]
        values |= {"latency": measured["prefill_ms"], "throughput": measured["decode_tokens_per_s"]}
        values["parameters"] = float(report["parameters"])
    if "flops" in names:
        from atp_ray.speed import prefill_flops
        from atp_ray.targets import load_target

        target = load_target(str(model), dtype).to(torch.device(device))
        with target.active() as active:
            values["flops"] = float(prefill_flops(active, 1, FLOPS_TOKENS))
        values["parameters"] = float(target.parameters)
    return values


# -- intermediate values ------------------------------------------------------------------------


def dense_reference(model_path: str, dtype: str, objectives: list[Objective], device: str, cache: Path) -> dict[str, float]:
    """Speed objectives of the dense model and its ``parameters``, measured once and kept in ``cache``."""
    names = {o.name for o in objectives if o.kind.speed}
    if not names:
        return {}
    if cache.is_file():
        return json.loads(cache.read_text())
    from atp_ray.run_folder import atomic_write_json

    reference = _speed(model_path, names, device, dtype)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, reference)
    return reference


def intermediate_objectives(
    objectives: list[Objective], params: float, eval_perplexity: float, reference: dict[str, float]
) -> dict[str, float]:
    """Every objective's value mid-run, from the latest held-out evaluation and the current mask.

    ``params`` is what the current mask keeps; speed estimates scale the dense ``reference``
    by the kept share of parameters.
    """
    share = params / reference["parameters"] if reference else math.nan
    estimates = {
        "quality": eval_perplexity,
        "params": params,
        "latency": reference.get("latency", math.nan) * share,
        "throughput": reference.get("throughput", math.nan) / share,
        "flops": reference.get("flops", math.nan) * share,
        "accuracy": 0.0,
    }
    return {o.name: float(estimates[o.name]) for o in objectives}
