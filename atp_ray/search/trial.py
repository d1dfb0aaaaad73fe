"""One search trial, start to finish: train -> compress -> evaluate, resumable at every stage.

Plain torch (no Ray): the search calls :func:`run_trial` inside a Tune trainable, and a
user can call it directly. A trial folder holds

    run/              the ATP run folder (atp_ray.runtime.run_folder)
    compressed/       the compressed model (atp_ray.compression.compress); for an elastic
                      run (several sparsity budgets), one folder per budget: sparsity-{key}/
    reference.json    the dense model's objectives, unless the caller keeps them elsewhere (a
                      search keeps one dense.json for all its trials)
    objectives.json   the final objective values, written last: the trial is done
    trial.json        the search's record of it: knobs, status, failure reason, wall time

An elastic trial has one model, so one point of the front, per budget. Its objectives.json
holds each budget's values under ``budgets`` (keyed as run folders name budgets, "0.2") and,
at its top level, each objective's mean over the budgets; its reports to the search carry
both: ``<objective>`` (the mean: the one vector Optuna is told) and ``<objective>@<key>``
per budget (what the trial table, the front and early stopping read).

Each stage is skipped when its output is already complete on disk, so a trial that died
in compression or evaluation, started again on the same folder, finishes from where it
stopped (training itself resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from atp_ray.compression.compress import budget_folder, compress_budgets, compress_run, is_compressed
from atp_ray.config import RunConfig
from atp_ray.errors import ATPRayError
from atp_ray.runtime.run_folder import RunFolder, atomic_write_json, budget_key
from atp_ray.search.objectives import (
    DenseMeasure,
    Objective,
    dense_reference,
    final_objectives,
    intermediate_objectives,
)
from atp_ray.training.atp import FINAL_EVAL_BLOCKS

log = logging.getLogger(__name__)

Objectives = dict[str, float]
BUDGETS = "budgets"  # objectives.json: an elastic trial's values per budget key
# Receives {objective name: intermediate value..., "step": ..., training metrics..., "final": 0.0}
# at every held-out evaluation, and {objective name: final value..., "final": 1.0} at the end.
TrialReport = Callable[[dict[str, float]], None]

DEFAULT_OBJECTIVES = [Objective("quality", "min"), Objective("params", "min")]


class TrialDiverged(ATPRayError):
    """Training or an objective produced a non-finite number; the trial cannot go on."""


class TrialFolder:
    """Paths of one trial's files."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.run = RunFolder(self.root / "run")
        self.compressed = self.root / "compressed"
        self.reference = self.root / "reference.json"
        self.objectives = self.root / "objectives.json"
        self.record = self.root / "trial.json"  # written by the search (atp_ray.search.tuner)

    def read_objectives(self) -> dict[str, Any] | None:
        """objectives.json as written (an elastic trial's holds ``budgets``), None until the trial is done."""
        return json.loads(self.objectives.read_text()) if self.objectives.is_file() else None

    def read_points(self) -> dict[float | None, Objectives] | None:
        """The finished trial's models and their objectives: budget -> values for an elastic
        trial, ``{None: values}`` for a trial with one model; None until the trial is done."""
        final = self.read_objectives()
        if final is None:
            return None
        if BUDGETS not in final:
            return {None: final}
        return {float(key): values for key, values in final[BUDGETS].items()}

    def model(self, budget: float | None = None) -> Path:
        """Where the compressed model of ``budget`` (None: the trial's one model) lies."""
        return self.compressed if budget is None else budget_folder(self.compressed, budget)


def per_budget(values: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """An elastic trial's values (budget key -> objective -> value) as objectives.json holds them:
    each objective's mean over the budgets, and the budgets themselves."""
    keys = sorted(values, key=float)
    names = list(values[keys[0]])
    mean = {name: sum(values[k][name] for k in keys) / len(keys) for name in names}
    return {**mean, BUDGETS: {k: dict(values[k]) for k in keys}}


def flat(final: Mapping[str, Any]) -> Objectives:
    """objectives.json as one report: the plain values, and ``<objective>@<key>`` per budget."""
    values = {k: float(v) for k, v in final.items() if k != BUDGETS}
    for key, budget in final.get(BUDGETS, {}).items():
        values |= {f"{name}@{key}": float(v) for name, v in budget.items()}
    return values


def run_trial(
    config: RunConfig,
    out: str | Path,
    *,
    objectives: list[Objective] | None = None,
    report: TrialReport | None = None,
    workers: int = 1,
    name: str | None = None,
    dense: Path | None = None,
) -> Objectives:
    """Train, compress and evaluate one ATP configuration in ``out``; returns the final objectives.

    For an elastic config (several sparsity budgets) every budget is compressed and measured:
    the values returned (and reported) are each objective's mean over the budgets and
    ``<objective>@<key>`` per budget (see the module docstring).
    ``workers`` > 1 trains with Ray Train (``atp_ray.training.distributed``; the config's
    ``distributed`` section says how) under the run name ``name``, and ``report`` is then
    called on Ray Train's controller at each of the workers' checkpoint reports.
    ``dense``: the file that keeps the dense model's objectives (default the trial folder's
    reference.json); a search passes one file for all its trials, so it is measured once.
    Raises :class:`TrialDiverged` when the loss or an objective is not finite.
    """
    folder = TrialFolder(Path(out))
    objectives = objectives or DEFAULT_OBJECTIVES
    done = folder.read_objectives()
    if done is not None:
        _send(report, {**flat(done), "step": float(config.train.steps), "final": 1.0})
        return flat(done)
    on_model_node = _stage_runner(config, workers)
    reference = on_model_node(reference_stage, config, objectives, dense or folder.reference)
    if not folder.run.is_finished():
        folder.root.mkdir(parents=True, exist_ok=True)
        step_report = _StepReport(objectives, reference, report)
        _train(config, folder.run.root, step_report, workers, name)
    final = on_model_node(final_stage, config, objectives, folder)
    values = flat(final)
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise TrialDiverged(f"trial {folder.root.name}: non-finite final objective(s) {bad}")
    atomic_write_json(folder.objectives, final)
    _send(report, {**values, "step": float(config.train.steps), "final": 1.0})
    return values


def _device(config: RunConfig) -> str:
    if config.train.device != "auto":
        return config.train.device
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- the model-sized stages: where the trial trains (see _stage_runner) --------------------------


def reference_stage(config: RunConfig, objectives: list[Objective], cache: Path) -> dict[str, float]:
    """The dense model's objectives and parameters (kept in ``cache``), measured on this process's
    device as the final stage measures a trial's model: on the run's own held-out split."""
    measure = DenseMeasure(
        config.model.path, config.data, config.train.seed, FINAL_EVAL_BLOCKS, config.train.batch_size,
        _device(config), config.model.dtype,
    )
    return dense_reference(measure, objectives, cache)


def final_stage(config: RunConfig, objectives: list[Objective], folder: TrialFolder) -> dict[str, Any]:
    """Compress the finished run (unless done) and measure the final objectives, in the run's dtype;
    an elastic run's at every budget (objectives.json's form, see :func:`per_budget`)."""

    def measure(model: Path) -> Objectives:
        return final_objectives(
            model, objectives, FINAL_EVAL_BLOCKS, config.train.batch_size, _device(config), config.model.dtype
        )

    if config.atp.elastic:
        compress_budgets(folder.run.root, folder.compressed)  # keeps the budgets already compressed
        return per_budget({budget_key(b): measure(folder.model(b)) for b in config.atp.budgets})
    if not is_compressed(folder.compressed):
        compress_run(folder.run.root, folder.compressed)
    return measure(folder.compressed)


def _stage_runner(config: RunConfig, workers: int) -> Callable[..., Any]:
    """How to run a model-sized stage: here, or, for a multi-worker trial, on a node of the kind its
    workers train on (a Ray task with one worker's resources): its driver sits on a GPU-less
    head, and latency must be that of the GPU the model will serve on."""
    if workers > 1:
        from atp_ray.training.distributed import stage_on_a_worker_node

        return stage_on_a_worker_node(config)
    return lambda stage, *args: stage(*args)


def _train(config: RunConfig, run_dir: Path, step_report: _StepReport, workers: int, name: str | None) -> None:
    if workers > 1:
        from atp_ray.training.distributed import run_distributed  # Ray Train: only multi-worker trials need it

        run_distributed(config, run_dir, run_name=name, report=step_report.from_train_report)
    else:
        from atp_ray.training.atp import run_atp

        run_atp(config, run_dir, on_step=step_report)


def _send(report: TrialReport | None, values: dict[str, float]) -> None:
    if report is not None:
        report(values)


class _StepReport:
    """The recipe's per-step hook: stops a diverging run and reports objectives at each evaluation.

    Called on every rank; a distributed run's workers report only from rank 0 (through Ray
    Train), so only one report per step reaches the search.
    """

    def __init__(self, objectives: list[Objective], reference: dict[str, float], report: TrialReport | None):
        self.objectives = objectives
        self.reference = reference
        self.report = report

    def __call__(self, step: int, masks: Any, metrics: dict[str, Any]) -> None:
        del masks  # what they keep is in metrics["params"] (an elastic run's: "params@<key>")
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        bad = sorted(k for k, v in numbers.items() if not math.isfinite(v))
        if bad:
            raise TrialDiverged(f"diverged at step {step}: {', '.join(bad)} not finite")
        values = self.objectives_now(metrics)
        if values is None:
            return  # objectives are reported at held-out evaluations, where quality is known
        # Objectives first (Tune's progress table shows a report's first few metrics), and never
        # overwritten by a training metric of the same name: an elastic run's "params" is what
        # the step's drawn budget keeps, the objective is the mean over the budgets.
        rest = {k: v for k, v in numbers.items() if k not in values}
        _send(self.report, {**values, "step": float(step), **rest, "final": 0.0})

    def objectives_now(self, metrics: Mapping[str, Any]) -> Objectives | None:
        """Intermediate objectives from a held-out evaluation's metrics (None at other steps): an
        elastic run's per budget (``eval_perplexity@<key>``, ``params@<key>``), with their means."""
        prefix = "eval_perplexity@"
        keys = [k.removeprefix(prefix) for k in metrics if k.startswith(prefix)]
        if keys:
            return flat(per_budget({k: self._estimate(metrics[f"params@{k}"], metrics[prefix + k]) for k in keys}))
        if "eval_perplexity" in metrics:
            return self._estimate(metrics["params"], metrics["eval_perplexity"])
        return None

    def _estimate(self, params: float, eval_perplexity: float) -> Objectives:
        return intermediate_objectives(self.objectives, params, eval_perplexity, self.reference)

    def from_train_report(self, metrics: dict[str, Any]) -> None:
        """Ray Train's reports (rank 0: the step and the last metrics.jsonl row), as a step."""
        if "done" not in metrics:  # the final report: the trial reports its final objectives itself
            self(int(metrics["step"]), None, {k: v for k, v in metrics.items() if k != "step"})
