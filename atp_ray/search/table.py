"""The trial table: one row per model of an experiment, from Tune's state and the trial folders.

A trial has one row, an elastic trial (several sparsity budgets) one row per budget. Columns:
``trial_id``, ``budget`` (the row's sparsity budget; NaN for a trial with one model),
``status`` (COMPLETED, RUNNING, PENDING, FAILED, STOPPED), ``knob.<key>`` per knob (the
trial's, on each of its rows), ``obj.<name>`` per objective (NaN until the trial has final
values), ``model_path`` (the compressed model, None until it exists), ``run_dir``,
``wall_time_s`` and ``failure_reason``. A last row, status DENSE and trial_id ``dense``, holds
the dense model's objectives (measured once per search, ``dense.json``) once a trial has
measured them: the report's reference point. The Optuna study is not the source: after a retry
it still holds the first attempt as FAIL. Curves are each trial's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from atp_ray.errors import ATPRayError
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.search.experiment import Experiment
from atp_ray.search.report_data import DENSE
from atp_ray.search.trial import TrialFolder

STATUSES = ("COMPLETED", "RUNNING", "PENDING", "FAILED", "STOPPED")
DENSE_ID = "dense"  # the dense model's row (Tune's trial ids are hexadecimal: never this)
# Tune's trial states -> ours, when the trial folder has no record of its own yet.
_TUNE_STATUS = {"PENDING": "PENDING", "PAUSED": "PENDING", "RUNNING": "RUNNING", "ERROR": "FAILED", "TERMINATED": "STOPPED"}


def tune_trials(experiment: Experiment) -> list[Any]:
    """Tune's trials as its experiment state last saved them (no Ray cluster needed)."""
    from ray.tune import ExperimentAnalysis

    try:
        return list(ExperimentAnalysis(experiment.tune_path).trials)
    except (ValueError, FileNotFoundError):  # the driver died before Tune saved any state
        return []


def trial_table(experiment: Experiment, running: bool = False) -> pd.DataFrame:
    """One row per trial (per budget of an elastic trial), in the order the trials were created,
    then the dense model's row when it has been measured.

    ``running`` says the search is still going: a trial whose record says RUNNING stays
    RUNNING; otherwise (the driver is gone) Tune's last saved state decides.
    """
    knobs = list(experiment.space.knobs)
    objectives = [o.name for o in experiment.space.objective_list()]
    fixed = experiment.space.fixed_overrides()
    rows = []
    tune_states = {t.trial_id: (t.status, t.config, _error_file(t)) for t in tune_trials(experiment)}
    folder_ids = {p.name for p in experiment.trials.iterdir()} if experiment.trials.is_dir() else set()
    # trial order: Tune's (creation order), then folders Tune never saved (newest driver's last moments)
    for trial_id in [*tune_states, *sorted(folder_ids - set(tune_states))]:
        folder = TrialFolder(experiment.trials / trial_id)
        record = _read_json(folder.record) or {}
        tune_status, config, error_file = tune_states.get(trial_id, (None, {}, None))
        params = {**fixed, **(config or {}), **record.get("knobs", {})}
        points = folder.read_points()
        status = _status(record.get("status"), tune_status, points is not None, running)
        reason = record.get("failure_reason") or (_first_line(error_file) if status == "FAILED" else None)
        for budget in points or _planned_budgets(experiment, params):
            values = (points or {}).get(budget, {})
            model = folder.model(budget)
            row: dict[str, Any] = {"trial_id": trial_id, "budget": math.nan if budget is None else budget, "status": status}
            row |= {f"knob.{k}": params.get(k) for k in knobs}
            row |= {f"obj.{n}": float(values.get(n, math.nan)) for n in objectives}
            row["model_path"] = str(model) if model.is_dir() and points is not None else None
            row["run_dir"] = str(folder.run.root)
            row["wall_time_s"] = float(record.get("wall_time_s", math.nan))
            row["failure_reason"] = reason
            rows.append(row)
    dense = _read_json(experiment.dense)
    if dense is not None:
        model = experiment.base.get("model", {}).get("path")
        rows.append({"trial_id": DENSE_ID, "budget": math.nan, "status": DENSE, "model_path": model} | {
            f"obj.{n}": float(dense.get(n, math.nan)) for n in objectives
        })
    columns = ["trial_id", "budget", "status", *(f"knob.{k}" for k in knobs), *(f"obj.{n}" for n in objectives)]
    return pd.DataFrame(rows, columns=[*columns, "model_path", "run_dir", "wall_time_s", "failure_reason"])


def _planned_budgets(experiment: Experiment, params: dict[str, Any]) -> list[float | None]:
    """The budgets an unfinished trial's config asks for ([None]: one model, or a config that
    cannot be built, such as a pending trial's without knobs yet)."""
    try:
        atp = experiment.space.run_config(params, experiment.base).atp
    except (ATPRayError, ValueError, TypeError):
        return [None]
    return list(atp.budgets) if atp.elastic else [None]


def _status(recorded: str | None, tune_status: str | None, finished: bool, running: bool) -> str:
    if finished:
        return "COMPLETED"
    if recorded in ("FAILED", "STOPPED"):
        return recorded
    if tune_status == "ERROR":
        return "FAILED"
    if recorded == "RUNNING" and (running or tune_status in (None, "RUNNING", "PENDING", "PAUSED")):
        return "RUNNING" if running else "PENDING"  # a dead driver's trial waits for `atp-ray resume`
    return _TUNE_STATUS.get(tune_status or "PENDING", "PENDING")


def trial_curves(experiment: Experiment, table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each trial's metrics.jsonl rows (only trials that logged any)."""
    curves = {}
    trials = table[table["status"] != DENSE].drop_duplicates("trial_id")  # an elastic trial: one run
    for trial_id, run_dir in zip(trials["trial_id"], trials["run_dir"]):
        path = RunFolder(Path(run_dir)).metrics
        if path.is_file() and path.stat().st_size:
            curves[trial_id] = pd.read_json(path, lines=True)
    return curves


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _error_file(trial: Any) -> str | None:
    # From the trial's storage folder: Trial.error_file goes through the driver's Ray session,
    # and a report is often written after the search's Ray has shut down.
    name = trial.run_metadata.error_filename
    return str(Path(trial.path) / name) if name else None


def _first_line(error_file: str | None) -> str | None:
    if not error_file or not Path(error_file).is_file():
        return None
    lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
    return lines[-1] if lines else None
