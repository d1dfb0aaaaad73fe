"""The search report's data preparation: one trial table in, everything the drawers draw out.

``prepare_report`` turns the trial table (one row per trial and budget, see ``write_report``)
and the per-trial metric curves into a ``ReportData``: which points are on the Pareto front
(among COMPLETED trials only: a stopped, failed or running trial never is), the hypervolume and
its reference point, the hypervolume after each completed trial, the curves in long form and a
colour scale per knob. A *point* is one model: a trial's, or, for an elastic trial (one model
per sparsity budget), one budget's; it is named ``trial_id`` or ``trial_id@budget``. The
table's optional ``DENSE`` row is the dense model the search started from: set apart as
``ReportData.dense``, drawn on every front panel and named in the summary as a reference, never
on the front, in the hypervolume or in the written trial tables. The drawers (``report_html``
with Plotly, ``report_png`` with Matplotlib) only draw what it prepared; ``report`` writes the
files. No Ray here: the report also runs on a copied folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from atp_ray.search.front import MODES, hypervolume, hypervolume_history, pareto_mask, reference_point

__all__ = ["STATUSES", "DENSE", "ColourScale", "ReportData", "ReportSummary", "prepare_report", "point_label"]

STATUSES = ("COMPLETED", "RUNNING", "PENDING", "FAILED", "STOPPED")
# The status of the table's reference row: the dense model, before any tuning or pruning.
DENSE = "DENSE"
KNOB = "knob."
OBJ = "obj."
BUDGET = "budget"  # an elastic trial's sparsity budget of the row (NaN: a trial with one model)
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


def point_label(trial_id: str, budget: float) -> str:
    """How a point is named: its trial id, with ``@budget`` for one budget of an elastic trial.

    The budget is written as run folders and metrics name it (``atp_ray.runtime.run_folder.budget_key``,
    not imported: the report needs no torch).
    """
    return str(trial_id) if pd.isna(budget) else f"{trial_id}@{round(float(budget), 4):g}"


@dataclass
class ReportData:
    """Everything the drawers need, computed once from the trial table."""

    trials: pd.DataFrame  # the input table's points (with `budget`) plus `point` (its label) and `on_front` (bool)
    objectives: dict[str, str]  # name -> "min" | "max", in table column order obj.<name>
    knobs: list[str]  # knob column names, "knob.<dotted.key>"
    reference: np.ndarray | None  # None while no trial has completed with every objective
    hypervolume: float
    history: pd.DataFrame  # one row per completed trial, in trial order: trial_id, completed, hypervolume
    curves: pd.DataFrame  # long form: trial_id, status, step, loss, sparsity
    colours: dict[str, ColourScale]  # colour column (each knob, and `budget` when elastic) -> colour scale
    running: bool
    dense: pd.Series | None = None  # the table's DENSE row: the dense model's objectives, if measured

    @property
    def objective_columns(self) -> list[str]:
        return [OBJ + name for name in self.objectives]

    @property
    def completed(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "COMPLETED"]

    @property
    def front(self) -> pd.DataFrame:
        return self.trials[self.trials["on_front"]]

    @property
    def elastic(self) -> bool:
        """Whether any trial has one model per budget (the table's rows then carry a budget)."""
        return bool(self.trials[BUDGET].notna().any())

    @property
    def colour_columns(self) -> list[str]:
        """What the front can be coloured by: each knob, then the budget of an elastic search."""
        return list(self.colours)

    def objective_pairs(self) -> list[tuple[str, str]]:
        """Axes of the front plots: every pair of objective columns (x, y)."""
        cols = self.objective_columns
        return [(cols[i], cols[j]) for i in range(len(cols)) for j in range(i + 1, len(cols))]

    def axis_label(self, column: str) -> str:
        name = column.removeprefix(OBJ)
        return f"{name} ({'lower' if self.objectives[name] == 'min' else 'higher'} is better)"

    def summary(self, out_dir: Path) -> ReportSummary:
        """The report's summary: trials per status (each trial once), the front, the dense model."""
        trials = self.trials.drop_duplicates("trial_id")
        dense = self.dense
        return ReportSummary(
            out_dir=out_dir,
            by_status={s: int((trials["status"] == s).sum()) for s in STATUSES},
            front=self.front["point"].tolist(),
            hypervolume=self.hypervolume,
            reference=None if self.reference is None else self.reference.tolist(),
            objectives=self.objectives,
            running=self.running,
            front_trials=len(set(self.front["trial_id"])),
            dense=None if dense is None else {name: float(dense[OBJ + name]) for name in self.objectives},
        )


@dataclass(frozen=True)
class ReportSummary:
    """What a user reads first: how many trials, the front, its hypervolume and the dense model."""

    out_dir: Path
    by_status: dict[str, int]  # trials per status (an elastic trial counts once)
    front: list[str]  # the points on the front (trial ids, ``trial_id@budget`` for an elastic trial's)
    hypervolume: float
    reference: list[float] | None
    objectives: dict[str, str]
    running: bool
    files: list[Path] = field(default_factory=list)
    front_trials: int | None = None  # trials with a point on the front (None: one per point)
    dense: dict[str, float] | None = None  # the dense model's objectives, when measured

    def front_text(self) -> str:
        """How many points the front holds, and of how many trials when a trial has several."""
        trials = self.front_trials if self.front_trials is not None else len(self.front)
        if trials == len(self.front):
            return f"{len(self.front)} trial(s)"
        return f"{len(self.front)} point(s) of {trials} trial(s)"

    def text(self) -> str:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in self.by_status.items() if n)
        lines = [
            f"report: {self.out_dir / 'report.html'}" + ("  (search still running)" if self.running else ""),
            f"trials: {sum(self.by_status.values())} ({counts or 'none'})",
            f"Pareto front: {self.front_text()}: {', '.join(self.front) or '-'}",
        ]
        if self.reference is None:
            lines.append("hypervolume: - (no completed trial with every objective yet)")
        else:
            ref = ", ".join(f"{name}={v:.6g}" for name, v in zip(self.objectives, self.reference))
            lines.append(f"hypervolume: {self.hypervolume:.6g} (reference point {ref})")
        if self.dense is not None:
            lines.append(f"dense model (before pruning): {self.dense_text()}")
        return "\n".join(lines)

    def dense_text(self) -> str:
        return ", ".join(f"{name}={v:.6g}" for name, v in (self.dense or {}).items())


def _check_table(table: pd.DataFrame, objectives: Mapping[str, str]) -> None:
    """Raise ValueError naming what is wrong with the table (``table`` has a ``budget`` column)."""
    missing = [c for c in REQUIRED if c not in table.columns]
    missing += [OBJ + name for name in objectives if OBJ + name not in table.columns]
    if missing:
        raise ValueError(f"trial table: missing column(s) {missing}; has {list(table.columns)}")
    if not objectives:
        raise ValueError("objectives: at least one objective is needed, got none")
    bad_modes = {n: m for n, m in objectives.items() if m not in MODES}
    if bad_modes:
        raise ValueError(f"objectives: each mode must be one of {MODES}, got {bad_modes}")
    bad = sorted(set(table["status"]) - {*STATUSES, DENSE})
    if bad:
        raise ValueError(f"trial table: column 'status' must be one of {(*STATUSES, DENSE)}, got {bad}")
    if (table["status"] == DENSE).sum() > 1:
        raise ValueError(f"trial table: at most one {DENSE} row (the dense model), got {(table['status'] == DENSE).sum()}")
    labels = pd.Series([point_label(t, b) for t, b in zip(table["trial_id"], table[BUDGET])])
    if labels.duplicated().any():
        repeated = sorted(set(labels[labels.duplicated()]))
        raise ValueError(f"trial table: (trial_id, budget) must be unique, repeated {repeated}")


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
    for trial_id in trials["trial_id"].unique():  # trial order; curves of unknown trials are not reported
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
    trials = table.reset_index(drop=True).copy()
    if BUDGET not in trials.columns:  # a table of trials with one model each
        trials.insert(1, BUDGET, np.nan)
    trials[BUDGET] = trials[BUDGET].astype(float)
    _check_table(trials, objectives)
    objectives = dict(objectives)
    modes = list(objectives.values())
    obj_cols = [OBJ + name for name in objectives]
    trials[obj_cols] = trials[obj_cols].astype(float)
    dense_rows = trials["status"] == DENSE  # the reference, set apart from the points
    dense = trials[dense_rows].iloc[0] if dense_rows.any() else None
    trials = trials[~dense_rows].reset_index(drop=True)
    trials.insert(0, "point", [point_label(t, b) for t, b in zip(trials["trial_id"], trials[BUDGET])])
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
    groups = trials.loc[completed, "trial_id"].tolist()  # an elastic trial's points count as one trial
    done = list(dict.fromkeys(groups))
    history = pd.DataFrame(
        {
            "trial_id": done,
            "completed": np.arange(1, len(done) + 1),
            "hypervolume": hypervolume_history(values, modes, ref, groups) if ref is not None else np.zeros(len(done)),
        }
    )
    knobs = [c for c in trials.columns if c.startswith(KNOB)]
    colours = {k: _colour_scale(trials[k]) for k in knobs}
    if trials[BUDGET].notna().any():
        colours[BUDGET] = replace(_colour_scale(trials[BUDGET]), title="budget (target sparsity)")
    return ReportData(
        trials=trials,
        objectives=objectives,
        knobs=knobs,
        reference=ref,
        hypervolume=hv,
        history=history,
        curves=_long_curves(curves, trials),
        colours=colours,
        running=running,
        dense=dense,
    )
