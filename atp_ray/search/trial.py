"""One search trial, start to finish: train -> compress -> evaluate, resumable at every stage.

Plain torch (no Ray): the search calls :func:`run_trial` inside a Tune trainable, and a
user can call it directly. A trial folder holds

    run/              the ATP run folder (atp_ray.runtime.run_folder)
    compressed/       the compressed model (atp_ray.compression.compress)
    reference.json    dense-model speed figures, when a speed objective is searched
    objectives.json   the final objective values, written last: the trial is done
    trial.json        the search's record of it: knobs, status, failure reason, wall time

Each stage is skipped when its output is already complete on disk, so a trial that died
in compression or evaluation, started again on the same folder, finishes from where it
stopped (training itself resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atp_ray.compression.compress import compress_run, is_compressed
from atp_ray.config import RunConfig
from atp_ray.errors import ATPRayError
from atp_ray.runtime.run_folder import RunFolder, atomic_write_json
from atp_ray.search.objectives import Objective, dense_reference, final_objectives, intermediate_objectives
from atp_ray.training.atp import FINAL_EVAL_BLOCKS

log = logging.getLogger(__name__)

Objectives = dict[str, float]
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

    def read_objectives(self) -> Objectives | None:
        return json.loads(self.objectives.read_text()) if self.objectives.is_file() else None


def run_trial(
    config: RunConfig,
    out: str | Path,
    *,
    objectives: list[Objective] | None = None,
    report: TrialReport | None = None,
    workers: int = 1,
    name: str | None = None,
) -> Objectives:
    """Train, compress and evaluate one ATP configuration in ``out``; returns the final objectives.

    ``workers`` > 1 trains with Ray Train (``atp_ray.training.distributed``; the config's
    ``distributed`` section says how) under the run name ``name``, and ``report`` is then
    called on Ray Train's controller at each of the workers' checkpoint reports.
    Raises :class:`TrialDiverged` when the loss or an objective is not finite.
    """
    folder = TrialFolder(Path(out))
    objectives = objectives or DEFAULT_OBJECTIVES
    done = folder.read_objectives()
    if done is not None:
        _send(report, {**done, "step": float(config.train.steps), "final": 1.0})
        return done
    on_model_node = _stage_runner(config, workers)
    reference = on_model_node(reference_stage, config, objectives, folder)
    if not folder.run.is_finished():
        folder.root.mkdir(parents=True, exist_ok=True)
        step_report = _StepReport(objectives, reference, report)
        _train(config, folder.run.root, step_report, workers, name)
    values = on_model_node(final_stage, config, objectives, folder)
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise TrialDiverged(f"trial {folder.root.name}: non-finite final objective(s) {bad}")
    atomic_write_json(folder.objectives, values)
    _send(report, {**values, "step": float(config.train.steps), "final": 1.0})
    return values


def _device(config: RunConfig) -> str:
    if config.train.device != "auto":
        return config.train.device
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- the model-sized stages: where the trial trains (see _stage_runner) --------------------------


def reference_stage(config: RunConfig, objectives: list[Objective], folder: TrialFolder) -> dict[str, float]:
    """The dense model's speed figures (cached in the trial folder), on this process's device."""
    return dense_reference(config.model.path, config.model.dtype, objectives, _device(config), folder.reference)


def final_stage(config: RunConfig, objectives: list[Objective], folder: TrialFolder) -> Objectives:
    """Compress the finished run (unless done) and measure the final objectives, in the run's dtype."""
    if not is_compressed(folder.compressed):
        compress_run(folder.run.root, folder.compressed)
    return final_objectives(
        folder.compressed, objectives, FINAL_EVAL_BLOCKS, config.train.batch_size, _device(config), config.model.dtype
    )


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
        del masks  # what they keep is in metrics["params"]
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        bad = sorted(k for k, v in numbers.items() if not math.isfinite(v))
        if bad:
            raise TrialDiverged(f"diverged at step {step}: {', '.join(bad)} not finite")
        if "eval_perplexity" not in metrics:
            return  # objectives are reported at held-out evaluations, where quality is known
        values = intermediate_objectives(self.objectives, metrics["params"], metrics["eval_perplexity"], self.reference)
        # objectives first: Tune's progress table shows the first few metrics of a report
        _send(self.report, {**values, "step": float(step), **numbers, "final": 0.0})

    def from_train_report(self, metrics: dict[str, Any]) -> None:
        """Ray Train's reports (rank 0: the step and the last metrics.jsonl row), as a step."""
        if "done" not in metrics:  # the final report: the trial reports its final objectives itself
            self(int(metrics["step"]), None, {k: v for k, v in metrics.items() if k != "step"})
