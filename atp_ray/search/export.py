"""Hand over one trial's compressed model as a folder of its own."""

from __future__ import annotations

import shutil
from pathlib import Path

from atp_ray.compression.compress import is_compressed
from atp_ray.errors import ConfigError
from atp_ray.search.experiment import Experiment
from atp_ray.search.trial import TrialFolder


def export_trial(experiment_dir: str | Path, trial_id: str, out: str | Path) -> Path:
    """Copy trial ``trial_id``'s compressed model to ``out`` (loadable by ``atp_ray.load_compressed``)."""
    experiment = Experiment.open(experiment_dir)
    folder = TrialFolder(experiment.trials / trial_id)
    if not folder.root.is_dir():
        known = sorted(p.name for p in experiment.trials.iterdir()) if experiment.trials.is_dir() else []
        raise ConfigError([f"--trial: no trial {trial_id!r} in {experiment.root} (trials: {', '.join(known) or 'none'})"])
    if folder.read_objectives() is None or not is_compressed(folder.compressed):
        raise ConfigError([f"--trial: trial {trial_id!r} has not finished; only completed trials have a model"])
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError([f"--out: {out} already exists and is not empty"])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(folder.compressed, partial)
    shutil.copy2(folder.objectives, partial / "objectives.json")
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out
