"""The interactive report page, drawn with Plotly from a prepared ``ReportData``.

The page is one self-contained file: Plotly's JavaScript is embedded inline (the machines that
run searches often have no network, so no CDN), and every figure is a div drawn by it.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from atp_ray.search.report_data import ReportData, ReportSummary

__all__ = ["render_html"]

FRONT_SYMBOL, OTHER_SYMBOL, DENSE_SYMBOL = "diamond", "circle", "star"
DENSE_COLOUR = "#d62728"  # the dense model's star on every front panel (report_png.DENSE_COLOUR)
COLOUR_MAP = "Viridis"  # the PNGs use the same (report_png.COLOUR_MAP)
LINE_DASH = {"COMPLETED": "solid", "RUNNING": "dot", "STOPPED": "dash", "FAILED": "dashdot", "PENDING": "dot"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: .6rem 1rem; border-radius: 4px; }
.summary td { padding: .1rem 1rem .1rem 0; }
table.front { border-collapse: collapse; font-size: .9rem; }
table.front th, table.front td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; }
table.front td { font-family: ui-monospace, monospace; }
.note { color: #666; font-size: .9rem; }
.scroll { overflow-x: auto; }
"""


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else html.escape(str(value))


def _hover(data: ReportData, rows: pd.DataFrame) -> list[str]:
    columns = [*(["budget"] if data.elastic else []), *data.objective_columns, *data.knobs]
    return [
        "<br>".join([f"<b>{_fmt(r['point'])}</b>"] + [f"{html.escape(c)}: {_fmt(r[c])}" for c in columns])
        for r in rows.to_dict("records")
    ]


def _colour_arrays(data: ReportData, rows: pd.Index) -> dict[str, list]:
    return {knob: np.asarray(scale.values)[rows].tolist() for knob, scale in data.colours.items()}


def _dense_trace(data: ReportData, x: str, y: str) -> go.Scatter | None:
    """The dense model as a labelled star, when both its values on these axes are known."""
    dense = data.dense
    if dense is None or not (np.isfinite(dense[x]) and np.isfinite(dense[y])):
        return None
    values = [f"{html.escape(c)}: {_fmt(dense[c])}" for c in data.objective_columns]
    hover = "<br>".join(["<b>dense</b>", "the model before tuning and pruning", *values])
    return go.Scatter(
        x=[dense[x]], y=[dense[y]], mode="markers+text", text=["dense"], textposition="top center",
        marker=dict(symbol=DENSE_SYMBOL, size=18, color=DENSE_COLOUR, line=dict(width=1, color="#222")),
        hovertext=[hover], hoverinfo="text", showlegend=False, name="dense model",
    )


def front_figure(data: ReportData) -> go.Figure:
    """One scatter per pair of objectives of the completed trials' points, coloured by a chosen knob.

    Front members are diamonds with a dark outline; a dropdown picks the knob (or, in an
    elastic search, the budget) that colours every panel (one shared colour axis). The dense
    model, when measured, is a red star on every panel.
    """
    pairs = data.objective_pairs()
    completed = data.completed
    rows = completed.index
    fig = make_subplots(rows=1, cols=max(1, len(pairs)), horizontal_spacing=0.08)
    colours = _colour_arrays(data, rows)
    first = data.colour_columns[0] if data.colour_columns else None
    marker = dict(
        size=np.where(completed["on_front"], 13, 9).tolist(),
        symbol=np.where(completed["on_front"], FRONT_SYMBOL, OTHER_SYMBOL).tolist(),
        line=dict(width=np.where(completed["on_front"], 1.5, 0.5).tolist(), color="#222"),
    )
    if first:
        marker.update(color=colours[first], coloraxis="coloraxis")
    hover = _hover(data, completed)
    points: list[int] = []  # the indices of the trials' traces (the dropdown recolours only those)
    for col, (x, y) in enumerate(pairs or [(data.objective_columns[0], data.objective_columns[0])], start=1):
        points.append(len(fig.data))
        fig.add_trace(
            go.Scatter(x=completed[x], y=completed[y], mode="markers", marker=marker, hovertext=hover, hoverinfo="text", showlegend=False),
            row=1,
            col=col,
        )
        dense = _dense_trace(data, x, y)
        if dense is not None:
            fig.add_trace(dense, row=1, col=col)
        fig.update_xaxes(title_text=data.axis_label(x), row=1, col=col)
        fig.update_yaxes(title_text=data.axis_label(y), row=1, col=col)
    if first:
        fig.update_layout(coloraxis=_colour_axis(data, first))
        buttons = [
            dict(
                label=data.colours[column].title,
                method="update",
                args=[{"marker.color": [colours[column]] * len(points)}, {"coloraxis": _colour_axis(data, column)}, points],
            )
            for column in data.colour_columns
        ]
        fig.update_layout(updatemenus=[dict(buttons=buttons, x=0, xanchor="left", y=1.18, yanchor="top", showactive=True)])
    title = ("colour by knob or budget:" if data.elastic else "colour by knob:") if first else ""
    fig.update_layout(height=460, margin=dict(t=90), title=dict(text=title, x=0, y=0.98))
    return fig


def _colour_axis(data: ReportData, knob: str) -> dict:
    scale = data.colours[knob]
    bar = dict(title=dict(text=scale.title))
    if scale.tickvals is not None:
        bar.update(tickvals=scale.tickvals, ticktext=scale.ticktext)
    return dict(colorscale=COLOUR_MAP, cmin=scale.vmin, cmax=scale.vmax, colorbar=bar)


def curves_figure(data: ReportData) -> go.Figure:
    """Loss and sparsity over steps, one line per trial (click a legend entry to hide it)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.07)
    palette = pio.templates["plotly"].layout.colorway
    for i, (trial_id, part) in enumerate(data.curves.groupby("trial_id", sort=False)):
        status = part["status"].iloc[0]
        line = dict(color=palette[i % len(palette)], dash=LINE_DASH.get(status, "solid"))
        for row, metric in enumerate(("loss", "sparsity"), start=1):
            fig.add_trace(
                go.Scatter(
                    x=part["step"], y=part[metric], mode="lines", line=line, name=f"{trial_id} ({status.lower()})",
                    legendgroup=trial_id, showlegend=row == 1,
                ),
                row=row,
                col=1,
            )
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="sparsity", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(height=560, margin=dict(t=30))
    return fig


def hypervolume_figure(data: ReportData) -> go.Figure:
    """Hypervolume of the completed trials so far, after each one, in trial order."""
    history = data.history
    fig = go.Figure(
        go.Scatter(
            x=history["completed"], y=history["hypervolume"], mode="lines+markers", line=dict(shape="hv"),
            hovertext=history["trial_id"], hovertemplate="after %{x} completed (%{hovertext})<br>HV %{y:.6g}<extra></extra>",
        )
    )
    fig.update_layout(height=360, margin=dict(t=30), xaxis_title="completed trials", yaxis_title="hypervolume")
    fig.update_xaxes(tick0=1, dtick=max(1, len(history) // 10))  # whole trials only
    return fig


def _front_table(data: ReportData) -> str:
    budget = ["budget"] if data.elastic else []
    columns = ["trial_id", *budget, *data.objective_columns, *data.knobs, "model_path", "wall_time_s"]
    front = data.front[columns]
    if front.empty:
        return '<p class="note">No completed trial yet.</p>'
    table = front.to_html(index=False, classes="front", float_format=lambda v: f"{v:.6g}", na_rep="-", border=0)
    return f'<div class="scroll">{table}</div>'  # many knobs make it wider than the page


def _summary(summary: ReportSummary) -> str:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in summary.by_status.items() if n) or "none"
    if summary.reference is None:
        hv = "- (no completed trial with every objective yet)"
    else:
        ref = ", ".join(f"{html.escape(n)} = {v:.6g}" for n, v in zip(summary.objectives, summary.reference))
        hv = f"{summary.hypervolume:.6g} &nbsp; <span class='note'>reference point: {ref}</span>"
    goals = ", ".join(f"{html.escape(n)} ({m})" for n, m in summary.objectives.items())
    rows = [("trials", counts), ("objectives", goals), ("Pareto front", summary.front_text()), ("hypervolume", hv)]
    if summary.dense is not None:
        dense = ", ".join(f"{html.escape(n)} = {v:.6g}" for n, v in summary.dense.items())
        rows.append(("dense model", f"{dense} &nbsp; <span class='note'>before tuning and pruning: the red star</span>"))
    return "<table class='summary'>" + "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _div(fig: go.Figure, div_id: str) -> str:
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False, "responsive": True})


ELASTIC_NOTE = " (one point per budget of an elastic trial, named trial@budget)"


def render_html(data: ReportData, summary: ReportSummary) -> str:
    """The whole report page as one HTML string."""
    banner = (
        '<p class="banner">The search is still running: this report shows the trials so far. '
        "Run <code>atp-ray report</code> again for an update.</p>"
        if data.running
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>atp-ray search report</title>
<style>{STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>atp-ray search report</h1>
{banner}
{_summary(summary)}
<h2>Pareto front</h2>
<p class="note">Completed trials only{ELASTIC_NOTE if data.elastic else ''};
diamonds with a dark outline are on the Pareto front. Stopped, failed and running trials are never on it.
{'The red star is the dense model the search started from: what pruning cost.' if data.dense is not None else ''}</p>
{_div(front_figure(data), "front")}
<h2>Front models</h2>
{_front_table(data)}
<h2>Training curves</h2>
<p class="note">Solid: completed, dashed: stopped early, dash-dot: failed, dotted: running.</p>
{_div(curves_figure(data), "curves")}
<h2>Hypervolume over trials</h2>
{_div(hypervolume_figure(data), "hypervolume")}
</body></html>
"""
