"""The report's static plots, drawn with Matplotlib from a prepared ``ReportData``.

Figures are built with ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot and no
global backend state), so drawing works on a headless node and inside a running search.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from atp_ray.search.report_data import ReportData

__all__ = ["render_pngs"]

PANEL = 4.0  # inches per panel side
DPI = 110
COLOUR_MAP = "viridis"  # the page uses the same (report_html.COLOUR_MAP)
DENSE_COLOUR = "#d62728"  # the dense model's star (report_html.DENSE_COLOUR)
NO_VALUE_COLOUR = "#999999"  # a point without the colouring value (a trial with one model, coloured by budget)
LINE_STYLE = {"COMPLETED": "-", "RUNNING": ":", "STOPPED": "--", "FAILED": "-.", "PENDING": ":"}


def _draw_dense(data: ReportData, ax, x: str, y: str) -> None:
    """The dense model as a labelled red star, when both its values on these axes are known."""
    dense = data.dense
    if dense is None or not (np.isfinite(dense[x]) and np.isfinite(dense[y])):
        return
    ax.scatter([dense[x]], [dense[y]], marker="*", s=260, c=DENSE_COLOUR, edgecolors="#222", linewidths=0.8, zorder=3)
    ax.annotate("dense", (dense[x], dense[y]), textcoords="offset points", xytext=(0, 9), ha="center", color=DENSE_COLOUR)
    ax.margins(0.1)  # room for the label


def front_png(data: ReportData, path: Path) -> Path:
    """Completed trials' points per objective pair (columns), coloured by each knob (rows; the budget
    too in an elastic search); front as diamonds, the dense model as a red star."""
    pairs = data.objective_pairs() or [(data.objective_columns[0], data.objective_columns[0])]
    knobs = data.colour_columns or [None]
    fig = Figure(figsize=(PANEL * len(pairs) + 1, PANEL * len(knobs)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(knobs), len(pairs), squeeze=False)
    completed = data.completed
    front = completed["on_front"].to_numpy()
    for r, knob in enumerate(knobs):
        scale = data.colours[knob] if knob else None
        colour = np.asarray(scale.values)[completed.index] if scale else None
        cmap = colormaps[COLOUR_MAP].with_extremes(bad=NO_VALUE_COLOUR)
        paint = dict(cmap=cmap, norm=Normalize(scale.vmin, scale.vmax), plotnonfinite=True) if scale else {}
        for c, (x, y) in enumerate(pairs):
            ax = axes[r][c]
            for mask, marker, size, edge in ((~front, "o", 30, 0.3), (front, "D", 60, 0.8)):
                points = ax.scatter(
                    completed[x][mask], completed[y][mask], marker=marker, s=size, edgecolors="#222", linewidths=edge,
                    **(dict(c=colour[mask], **paint) if paint else {}),
                )
            _draw_dense(data, ax, x, y)
            ax.set_xlabel(data.axis_label(x))
            ax.set_ylabel(data.axis_label(y))
        if scale:
            bar = fig.colorbar(points, ax=axes[r].tolist())
            bar.set_label(scale.title)
            if scale.tickvals is not None:
                bar.set_ticks(scale.tickvals, labels=scale.ticktext)
    dense = ", dense model: red star" if data.dense is not None else ""
    fig.suptitle(f"Pareto front (diamonds) among completed trials{dense}")
    fig.savefig(path)
    return path


def curves_png(data: ReportData, path: Path) -> Path:
    """Loss and sparsity over steps, one line per trial, line style by status."""
    fig = Figure(figsize=(9, 6.5), dpi=DPI, layout="constrained")
    loss_ax, sparsity_ax = fig.subplots(2, 1, sharex=True)
    for trial_id, part in data.curves.groupby("trial_id", sort=False):
        style = LINE_STYLE.get(part["status"].iloc[0], "-")
        (line,) = loss_ax.plot(part["step"], part["loss"], style, label=f"{trial_id} ({part['status'].iloc[0].lower()})")
        sparsity_ax.plot(part["step"], part["sparsity"], style, color=line.get_color())
    loss_ax.set_ylabel("loss")
    sparsity_ax.set_ylabel("sparsity")
    sparsity_ax.set_xlabel("step")
    if len(data.curves):
        loss_ax.legend(fontsize="small", ncols=2)
    fig.savefig(path)
    return path


def hypervolume_png(data: ReportData, path: Path) -> Path:
    """Hypervolume after each completed trial."""
    fig = Figure(figsize=(7, 4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.step(data.history["completed"], data.history["hypervolume"], where="post", marker="o")
    ax.set_xlabel("completed trials")
    ax.set_ylabel("hypervolume")
    fig.savefig(path)
    return path


def render_pngs(data: ReportData, out_dir: Path) -> list[Path]:
    """Write front.png, curves.png and hypervolume.png into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    return [
        front_png(data, out_dir / "front.png"),
        curves_png(data, out_dir / "curves.png"),
        hypervolume_png(data, out_dir / "hypervolume.png"),
    ]
