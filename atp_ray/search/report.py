"""The search report: one trial table in, tables, an interactive page and PNG plots out.

:mod:`atp_ray.search.report_data` prepares what is drawn (the front, the hypervolume, curves,
colour scales); :mod:`~atp_ray.search.report_html` (Plotly) and
:mod:`~atp_ray.search.report_png` (Matplotlib) draw it; this module writes the files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from atp_ray.search.report_data import BUDGET, ReportSummary, prepare_report
from atp_ray.search.report_html import render_html
from atp_ray.search.report_png import render_pngs

__all__ = ["write_report"]


def _write_text(path: Path, text: str) -> None:
    # Written aside then renamed: a browser refreshing the report of a running search never
    # sees half a page.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    table: pd.DataFrame,
    objectives: dict[str, str],
    curves: dict[str, pd.DataFrame],
    out_dir: Path,
    *,
    running: bool = False,
    reference: Sequence[float] | None = None,
) -> ReportSummary:
    """Write the search report into ``out_dir`` and return its summary.

    Args:
        table: one row per trial, or per (trial, budget) for an elastic trial: ``trial_id``
            (str), optional ``budget`` (the row's sparsity budget; NaN or absent for a trial with
            one model), ``status`` (one of ``STATUSES``), knob columns ``knob.<dotted.key>``,
            objective columns ``obj.<name>`` (float, NaN when missing), ``model_path``,
            ``run_dir``, ``wall_time_s``, ``failure_reason``; rows in trial order (the
            hypervolume history follows it). At most one row may have status ``DENSE``: the
            dense model the search started from, drawn on every front panel as a reference and
            named in the summary; the written trial tables hold the points only.
        objectives: objective name -> "min" or "max".
        curves: trial id -> that trial's metrics.jsonl rows (``step``, ``loss``, ``sparsity``, ...).
        out_dir: created if needed; receives trials.parquet, trials.csv, front.csv,
            report.html and front.png, curves.png, hypervolume.png.
        running: the search is still going; the page says so.
        reference: hypervolume reference point, one value per objective; by default derived
            from the completed trials with ``front.reference_point``.
    """
    data = prepare_report(table, objectives, curves, running=running, reference=reference)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.trials.to_parquet(out_dir / "trials.parquet", index=False)
    data.trials.to_csv(out_dir / "trials.csv", index=False)
    front_cols = ["trial_id", BUDGET, *data.objective_columns, *data.knobs, "model_path", "run_dir", "wall_time_s"]
    data.front[front_cols].to_csv(out_dir / "front.csv", index=False)
    summary = data.summary(out_dir)
    _write_text(out_dir / "report.html", render_html(data, summary))
    pngs = render_pngs(data, out_dir)
    return replace(summary, files=[out_dir / n for n in ("trials.parquet", "trials.csv", "front.csv", "report.html")] + pngs)
