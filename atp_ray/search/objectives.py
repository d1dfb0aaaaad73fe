"""What a search optimises: the objective registry and how each objective is measured.

Plain torch (no Ray), shared by :func:`atp_ray.search.trial.run_trial` and the search layer.
Every objective has a *final* value, measured on the trial's compressed model, and an
*intermediate* value reported while the trial trains (Tune checks that every report
carries every objective). Each entry of the registry, :data:`OBJECTIVES` at the end of this
module, says how to get both, so adding an objective is one entry there and its test; the
table in docs/search.md lists them (tests/test_docs.py keeps it equal to the registry).

Speed measurements are noisy on shared machines; ``flops`` ranks by compute and never
changes between runs. The dense model the trials start from is measured once, like a trial's
compressed model (:func:`dense_reference`): it is the report's reference point (what pruning
cost), and its speed figures scaled by the kept share are the intermediate speed estimates, so
that early stopping can compare trials mid-run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch

if TYPE_CHECKING:
    from atp_ray.config import DataConfig

log = logging.getLogger(__name__)

Mode = Literal["min", "max"]

# Tokens in the prompt whose prefill FLOPs the ``flops`` objective counts.
FLOPS_TOKENS = 128
# Rows of a task scored for the ``accuracy`` objective unless the space says otherwise.
ACCURACY_SAMPLES = 100


@dataclass(frozen=True)
class Progress:
    """What a trial knows mid-run: its latest held-out perplexity, the parameters its current mask
    keeps, and the dense model's speed figures and ``parameters`` (empty without speed objectives)."""

    params: float
    eval_perplexity: float
    reference: dict[str, float]

    @property
    def kept_share(self) -> float:
        return self.params / self.reference["parameters"] if self.reference else math.nan

    def scaled(self, name: str) -> float:
        """A dense figure that shrinks with the model (latency, FLOPs), scaled by the kept share."""
        return self.reference.get(name, math.nan) * self.kept_share


@dataclass(frozen=True)
class ObjectiveKind:
    """One entry of the registry: its default direction, what it measures and how.

    ``final`` measures it on the compressed model (from the model's :class:`FinalMeasure` and
    the objective as the space asks for it); ``intermediate`` estimates it from a trial's
    :class:`Progress`.
    """

    name: str
    mode: Mode
    description: str
    final: Callable[[FinalMeasure, Objective], float]
    intermediate: Callable[[Progress], float]
    speed: bool = False  # intermediate value scaled from a dense-model reference
    final_only: bool = False  # no meaningful intermediate value
    needs_task: bool = False  # the space names the task it is scored on (``task:``)


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


class FinalMeasure:
    """Measures one compressed model folder, loaded in ``dtype`` on ``device``; each speed
    measurement runs once (one latency run gives both latency and throughput)."""

    def __init__(self, model: Path | str, eval_blocks: int, batch_size: int, device: str, dtype: str):
        self.model = model
        self.eval_blocks = eval_blocks
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self._speed: dict[str, float] = {}

    def task(self, task: str, metric: str, samples: int) -> float:
        """One metric of one task, scored by ``atp-ray eval``'s own recipe."""
        from atp_ray.evaluation.eval_recipe import run_eval

        report = run_eval(
            str(self.model), [task], max_samples=samples, batch_size=self.batch_size, dtype=self.dtype,
            device=self.device,
        )
        (result,) = report["tasks"].values()
        return float(result["values"][metric])

    def params(self) -> float:
        """The compressed model's exact parameter count, from its record."""
        from atp_ray.compression.compress import read_record

        return float(read_record(self.model).params)

    def speed(self, name: str) -> float:
        """One speed figure (latency, throughput, flops)."""
        if name not in self._speed:
            self._speed |= _speed(self.model, {name}, self.device, self.dtype)
        return self._speed[name]


class DenseMeasure(FinalMeasure):
    """Measures the dense model the trials start from (a hub id, local folder or the embedded
    model) as :class:`FinalMeasure` measures a compressed one. A compressed folder knows the
    data its run held out; the dense model does not, so ``data`` and ``seed`` (the trials' run
    config's ``data`` and ``train.seed``) say which held-out split its perplexity is taken on."""

    def __init__(self, model: str, data: DataConfig, seed: int, eval_blocks: int, batch_size: int, device: str, dtype: str):
        super().__init__(model, eval_blocks, batch_size, device, dtype)
        self.data, self.seed = data, seed
        self._parameters: float | None = None

    def task(self, task: str, metric: str, samples: int) -> float:
        """One metric of one task, scored on the trials' own held-out split (the model is loaded
        for the call and dropped after it, so that a big model is never held twice)."""
        from atp_ray.evaluation.targets import load_target
        from atp_ray.evaluation.tasks import TaskContext, resolve_tasks

        (build,) = resolve_tasks([task])
        target = load_target(str(self.model), self.dtype).to(torch.device(self.device))
        self._parameters = float(target.parameters)
        context = TaskContext(
            tokenizer=target.tokenizer,
            max_length=target.model.config.max_position_embeddings,
            max_samples=samples,
            batch_size=self.batch_size,
            data=self.data,
            seed=self.seed,
        )
        with target.active() as model:
            return float(build(context).score(model).values[metric])

    def params(self) -> float:
        """The dense model's parameter count (every parameter: nothing is pruned)."""
        if self._parameters is None:
            from atp_ray.evaluation.targets import load_target

            self._parameters = float(load_target(str(self.model), self.dtype).parameters)
        return self._parameters


def final_objectives(
    compressed: Path,
    objectives: list[Objective],
    eval_blocks: int,
    batch_size: int,
    device: str,
    dtype: str = "float32",
) -> dict[str, float]:
    """Measure every objective on a compressed model folder, loaded in ``dtype`` on ``device``."""
    measure = FinalMeasure(compressed, eval_blocks, batch_size, device, dtype)
    return {o.name: o.kind.final(measure, o) for o in objectives}


def _speed(model: Path | str, names: set[str], device: str, dtype: str = "float32") -> dict[str, float]:
    """latency / throughput / flops of a model (compressed folder or dense model path)."""
    values: dict[str, float] = {}
    if names & {"latency", "throughput"}:
        from atp_ray.evaluation.eval_recipe import run_eval

        report = run_eval(str(model), ["latency"], max_samples=None, dtype=dtype, device=device)
        measured = report["tasks"]["latency"]["values"]
        values |= {"latency": measured["prefill_ms"], "throughput": measured["decode_tokens_per_s"]}
        values["parameters"] = float(report["parameters"])
    if "flops" in names:
        from atp_ray.compression.speed import prefill_flops
        from atp_ray.evaluation.targets import load_target

        target = load_target(str(model), dtype).to(torch.device(device))
        with target.active() as active:
            values["flops"] = float(prefill_flops(active, 1, FLOPS_TOKENS))
        values["parameters"] = float(target.parameters)
    return values


# -- intermediate values ------------------------------------------------------------------------


def dense_reference(measure: DenseMeasure, objectives: list[Objective], cache: Path) -> dict[str, float]:
    """The dense model's value of every objective and its ``parameters``, measured once and kept in ``cache``.

    The values are what pruning starts from: the report draws them as the dense model's point,
    and the intermediate speed estimates scale its speed figures by the kept share. ``cache``
    may be shared by the trials of a search (the experiment's ``dense.json``): the first to come
    measures, under a lock, and the others wait and read; an objective the cache lacks (a cache
    from an older search, or another space on the same folder) is measured and added.
    """
    cached = _read_reference(cache)
    if all(o.name in cached for o in objectives) and "parameters" in cached:
        return cached
    from atp_ray.runtime.run_folder import atomic_write_json

    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first trials: one measures, the others wait
        except OSError:  # a shared file system without locks: each may measure, the last write stays
            log.warning("%s: cannot lock it; concurrent trials may each measure the dense model", cache)
        reference = _read_reference(cache)
        missing = [o for o in objectives if o.name not in reference]
        reference |= {o.name: float(o.kind.final(measure, o)) for o in missing}
        if "parameters" not in reference:  # the dense parameter count: the params objective's value, when asked
            reference["parameters"] = reference["params"] if "params" in reference else measure.params()
        atomic_write_json(cache, reference)
    return reference


def _read_reference(cache: Path) -> dict[str, float]:
    return json.loads(cache.read_text()) if cache.is_file() else {}


def intermediate_objectives(
    objectives: list[Objective], params: float, eval_perplexity: float, reference: dict[str, float]
) -> dict[str, float]:
    """Every objective's value mid-run, from the latest held-out evaluation and the current mask.

    ``params`` is what the current mask keeps; speed estimates scale the dense ``reference``
    by the kept share of parameters.
    """
    progress = Progress(params, eval_perplexity, reference)
    return {o.name: float(o.kind.intermediate(progress)) for o in objectives}


# -- the registry: adding an objective is one entry here (and its test) ------------------------

OBJECTIVES: dict[str, ObjectiveKind] = {
    k.name: k
    for k in (
        ObjectiveKind(
            "quality", "min", "held-out perplexity of the compressed model on the run's own eval split",
            final=lambda m, o: m.task("domain-ppl", "perplexity", m.eval_blocks),
            intermediate=lambda p: p.eval_perplexity,
        ),
        ObjectiveKind(
            "params", "min", "exact parameter count of the compressed model",
            final=lambda m, o: m.params(),
            intermediate=lambda p: p.params,
        ),
        ObjectiveKind(
            "latency", "min", "prefill latency of a 256-token prompt at batch 1 (ms)",
            final=lambda m, o: m.speed("latency"),
            intermediate=lambda p: p.scaled("latency"),
            speed=True,
        ),
        ObjectiveKind(
            "throughput", "max", "greedy decode speed at batch 1 (tokens/s)",
            final=lambda m, o: m.speed("throughput"),
            intermediate=lambda p: p.reference.get("throughput", math.nan) / p.kept_share,
            speed=True,
        ),
        ObjectiveKind(
            "flops", "min", f"matmul FLOPs of one {FLOPS_TOKENS}-token prefill",
            final=lambda m, o: m.speed("flops"),
            intermediate=lambda p: p.scaled("flops"),
            speed=True,
        ),
        ObjectiveKind(
            "accuracy", "max", "accuracy on an evaluation task (give task:)",
            final=lambda m, o: m.task(o.task, "accuracy", o.max_samples),
            intermediate=lambda p: 0.0,  # known only at the end
            final_only=True,
            needs_task=True,
        ),
    )
}
