"""The search report's data preparation: one trial table in, everything the drawers draw out.

``prepare_report`` turns the trial table (one row per trial, see ``write_report``) and the
per-trial metric curves into a ``ReportData``: which trials are on the Pareto front (among
COMPLETED trials only: a stopped, failed or running trial never is), the hypervolume and its
reference point, the hypervolume after each completed trial, the curves in long form and a
colour scale per knob. The drawers (``report_html`` with Plotly, ``report_png`` with
Matplotlib) only draw what it prepared; ``report`` writes the files. No Ray here: the report
also runs on a copied folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from atp_ray.search.front import MODES, hypervolume, hypervolume_history, pareto_mask, reference_point

__all__ = ["STATUSES", "ColourScale", "ReportData", "ReportSummary", "prepare_report"]

STATUSES = ("COMPLETED", "RUNNING", "PENDING", "FAILED", "STOPPED")
KNOB = "knob."
OBJ = "obj."
REQUIRED = ("trial_id", "status", "model_path", "run_dir", "wall_time_s", "failure_reason")
CURVE_METRICS = ("loss", "sparsity")
# A positive knob spanning this many decades or more (learning rates, lasso strengths) is
# coloured on a log scale, otherwise one trial's colour would flatten all the others.
LOG_COLOUR_DECADES = 2.0


@dataclass(frozen=True)
class ColourScale:
    """Numbers to colour trials by one knob, and how to label the colour bar.

    ``values`` is aligned with ``ReportData.trials``; categorical knobs become codes 0..m-1
    and log-scaled knobs log10 values, with ``tickvals``/``ticktext`` naming the originals.
    """

    title: str
    values: np.ndarray
    vmin: float  # colour range over every trial, so colours do not shift as trials complete
    vmax: float
    tickvals: list[float] | None = None
    ticktext: list[str] | None = None


@dataclass
class ReportData:
    """Everything the drawers need, computed once from the trial table."""

    trials: pd.DataFrame  # the input table plus `on_front` (bool)
    objectives: dict[str, str]  # name -> "min" | "max", in table column order obj.<name>
    knobs: list[str]  # knob column names, "knob.<dotted.key>"
    reference: np.ndarray | None  # None while no trial has completed with every objective
    hypervolume: float
    history: pd.DataFrame  # one row per completed trial, in trial order: trial_id, completed, hypervolume
    curves: pd.DataFrame  # long form: trial_id, status, step, loss, sparsity
    colours: dict[str, ColourScale]  # knob column -> colour scale
    running: bool

    @property
    def objective_columns(self) -> list[str]:
        return [OBJ + name for name in self.objectives]

    @property
    def completed(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "COMPLETED"]

    @property
    def front(self) -> pd.DataFrame:
        return self.trials[self.trials["on_front"]]

    def objective_pairs(self) -> list[tuple[str, str]]:
        """Axes of the front plots: every pair of objective columns (x, y)."""
        cols = self.objective_columns
        return [(cols[i], cols[j]) for i in range(len(cols)) for j in range(i + 1, len(cols))]

    def axis_label(self, column: str) -> str:
        name = column.removeprefix(OBJ)
        return f"{name} ({'lower' if self.objectives[name] == 'min' else 'higher'} is better)"


@dataclass(frozen=True)
class ReportSummary:
    """What a user reads first: how many trials, the front, and its hypervolume."""

    out_dir: Path
    by_status: dict[str, int]
    front: list[str]  # trial ids on the front
    hypervolume: float
    reference: list[float] | None
    objectives: dict[str, str]
    running: bool
    files: list[Path] = field(default_factory=list)

    def text(self) -> str:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in self.by_status.items() if n)
        lines = [
            f"report: {self.out_dir / 'report.html'}" + ("  (search still running)" if self.running else ""),
            f"trials: {sum(self.by_status.values())} ({counts or 'none'})",
            f"Pareto front: {len(self.front)} trial(s): {', '.join(self.front) or '-'}",
        ]
        if self.reference is None:
            lines.append("hypervolume: - (no completed trial with every objective yet)")
        else:
            ref = ", ".join(f"{name}={v:.6g}" for name, v in zip(self.objectives, self.reference))
            lines.append(f"hypervolume: {self.hypervolume:.6g} (reference point {ref})")
        return "\n".join(lines)


def _check_table(table: pd.DataFrame, objectives: Mapping[str, str]) -> None:
    missing = [c for c in REQUIRED if c not in table.columns]
    missing += [OBJ + name for name in objectives if OBJ + name not in table.columns]
    if missing:
        raise ValueError(f"trial table: missing column(s) {missing}; has {list(table.columns)}")
    if not objectives:
        raise ValueError("objectives: at least one objective is needed, got none")
    bad_modes = {n: m for n, m in objectives.items() if m not in MODES}
    if bad_modes:
        raise ValueError(f"objectives: each mode must be one of {MODES}, got {bad_modes}")
    bad = sorted(set(table["status"]) - set(STATUSES))
    if bad:
        raise ValueError(f"trial table: column 'status' must be one of {STATUSES}, got {bad}")
    if table["trial_id"].duplicated().any():
        raise ValueError(f"trial table: trial_id must be unique, repeated {sorted(table['trial_id'][table['trial_id'].duplicated()])}")


def _colour_scale(series: pd.Series) -> ColourScale:
    title = series.name.removeprefix(KNOB)
    numeric = pd.to_numeric(series, errors="coerce")
    if numeric.notna().sum() != series.notna().sum() or series.dtype == bool:
        categories = sorted(series.dropna().astype(str).unique())
        codes = series.map(lambda v: categories.index(str(v)) if pd.notna(v) else np.nan)
        ticks = [float(i) for i in range(len(categories))]
        return ColourScale(title, codes.to_numpy(float), 0.0, max(ticks[-1], 1.0) if ticks else 1.0, ticks, categories)
    values = numeric.to_numpy(float)
    finite = values[np.isfinite(values)]
    if not len(finite):
        return ColourScale(title, values, 0.0, 1.0)
    low, high = float(finite.min()), float(finite.max())
    if low > 0 and math.log10(high / low) >= LOG_COLOUR_DECADES:
        # Whole decades bound the range, so every tick (1e-4, 1e-3, ...) lies on the bar.
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        ticks = list(range(first, last + 1))
        return ColourScale(title + " (log scale)", np.log10(values), first, last, [float(t) for t in ticks], [f"1e{t}" for t in ticks])
    return ColourScale(title, values, low, high if high > low else low + 1.0)


def _long_curves(curves: Mapping[str, pd.DataFrame], trials: pd.DataFrame) -> pd.DataFrame:
    status = dict(zip(trials["trial_id"], trials["status"]))
    frames = []
    for trial_id in trials["trial_id"]:  # trial order; curves of unknown trials are not reported
        frame = curves.get(trial_id)
        if frame is None or frame.empty or "step" not in frame.columns:
            continue
        part = pd.DataFrame({"step": frame["step"].to_numpy()})
        for metric in CURVE_METRICS:
            part[metric] = frame[metric].to_numpy(float) if metric in frame.columns else np.nan
        part.insert(0, "status", status[trial_id])
        part.insert(0, "trial_id", trial_id)
        frames.append(part)
    columns = ["trial_id", "status", "step", *CURVE_METRICS]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def prepare_report(
    table: pd.DataFrame,
    objectives: Mapping[str, str],
    curves: Mapping[str, pd.DataFrame],
    *,
    running: bool = False,
    reference: Sequence[float] | None = None,
) -> ReportData:
    """Compute the front, hypervolume, history, curves and colour scales (see ``write_report``)."""
    _check_table(table, objectives)
    objectives = dict(objectives)
    modes = list(objectives.values())
    trials = table.reset_index(drop=True).copy()
    obj_cols = [OBJ + name for name in objectives]
    trials[obj_cols] = trials[obj_cols].astype(float)
    completed = (trials["status"] == "COMPLETED").to_numpy()
    values = trials.loc[completed, obj_cols].to_numpy(float)

    on_front = np.zeros(len(trials), dtype=bool)
    on_front[completed] = pareto_mask(values, modes) if len(values) else []
    trials["on_front"] = on_front

    finite = ~np.isnan(values).any(axis=1) if len(values) else np.zeros(0, bool)
    if reference is not None:
        ref = np.asarray(reference, dtype=float)
        if ref.shape != (len(objectives),):
            raise ValueError(f"reference: expected one value per objective {list(objectives)}, got {list(reference)}")
    else:
        ref = reference_point(values, modes) if finite.any() else None
    hv = hypervolume(values, modes, ref) if ref is not None else 0.0
    history = pd.DataFrame(
        {
            "trial_id": trials.loc[completed, "trial_id"].to_numpy(),
            "completed": np.arange(1, completed.sum() + 1),
            "hypervolume": hypervolume_history(values, modes, ref) if ref is not None else np.zeros(completed.sum()),
        }
    )
    knobs = [c for c in trials.columns if c.startswith(KNOB)]
    return ReportData(
        trials=trials,
        objectives=objectives,
        knobs=knobs,
        reference=ref,
        hypervolume=hv,
        history=history,
        curves=_long_curves(curves, trials),
        colours={k: _colour_scale(trials[k]) for k in knobs},
        running=running,
    )
