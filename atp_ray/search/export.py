"""Hand over one trial's compressed model as a folder of its own."""

from __future__ import annotations

import shutil
from pathlib import Path

from atp_ray.compression.compress import is_compressed
from atp_ray.errors import ConfigError
from atp_ray.runtime.run_folder import atomic_write_json, budget_key
from atp_ray.search.experiment import Experiment
from atp_ray.search.trial import TrialFolder


def export_trial(experiment_dir: str | Path, trial_id: str, out: str | Path, sparsity: float | None = None) -> Path:
    """Copy trial ``trial_id``'s compressed model to ``out`` (loadable by ``atp_ray.load_compressed``),
    with its objectives in ``objectives.json``.

    An elastic trial has one model per sparsity budget: ``sparsity`` names which (required,
    and refused with the trial's budgets named when missing or not one of them); a trial with
    one model takes none.
    """
    experiment = Experiment.open(experiment_dir)
    folder = TrialFolder(experiment.trials / trial_id)
    if not folder.root.is_dir():
        known = sorted(p.name for p in experiment.trials.iterdir()) if experiment.trials.is_dir() else []
        raise ConfigError([f"--trial: no trial {trial_id!r} in {experiment.root} (trials: {', '.join(known) or 'none'})"])
    points = folder.read_points()
    if points is None:
        raise ConfigError([f"--trial: trial {trial_id!r} has not finished; only completed trials have a model"])
    budget = _budget(trial_id, sorted(points, key=lambda b: -1.0 if b is None else b), sparsity)
    model = folder.model(budget)
    if not is_compressed(model):
        raise ConfigError([f"--trial: trial {trial_id!r} has no compressed model in {model}"])
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError([f"--out: {out} already exists and is not empty"])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(model, partial)
    atomic_write_json(partial / "objectives.json", points[budget])  # this model's values alone
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out


def _budget(trial_id: str, budgets: list[float | None], sparsity: float | None) -> float | None:
    """Which of the trial's models ``sparsity`` names (ConfigError naming the budgets when none)."""
    if budgets == [None]:
        if sparsity is not None:
            raise ConfigError([f"--sparsity: trial {trial_id!r} has one model; --sparsity is for elastic trials"])
        return None
    names = ", ".join(budget_key(b) for b in budgets)
    if sparsity is None:
        raise ConfigError([f"--sparsity: trial {trial_id!r} is elastic, with one model per budget; choose one of {names}"])
    for budget in budgets:
        if budget_key(budget) == budget_key(sparsity):
            return budget
    raise ConfigError([f"--sparsity: trial {trial_id!r} has no model at sparsity {sparsity:g}; its budgets: {names}"])
