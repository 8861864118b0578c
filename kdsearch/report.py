"""An HTML report and pandas tables of a study.

The report is one self-contained file (plotly.js inline, no network needed to open it):
optimization history, learning curves coloured by state with ASHA's cuts, parallel coordinates,
parameter importances, the promoted leaderboard with seed spread, and each searched
distillation parameter against the metric.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Iterable
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import (
    plot_optimization_history,
    plot_parallel_coordinate,
    plot_param_importances,
    plot_slice,
)

from kdsearch.promote import leaderboard, promoted_name
from kdsearch.study import load_study, study_names

STATE_COLOURS = {
    "COMPLETE": "#2ca02c",
    "PRUNED": "#ff7f0e",
    "FAIL": "#d62728",
    "RUNNING": "#7f7f7f",
}


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, epochs run, and every parameter."""
    rows = []
    for t in study.trials:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "epochs": t.user_attrs.get("epochs"),
        }
        row.update(t.params)
        rows.append(row)
    return pd.DataFrame(rows, columns=_columns(study.trials))


def _columns(trials: Iterable[FrozenTrial]) -> list[str]:
    names: list[str] = []
    for t in trials:
        names += [p for p in t.params if p not in names]
    return ["number", "state", "value", "epochs", *names]


def learning_curves(study: optuna.Study) -> go.Figure:
    """Every trial's validation curve, coloured by state; a pruned curve ends where ASHA cut it."""
    fig = go.Figure()
    shown: set[str] = set()
    for t in study.trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        state = t.state.name
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[t.intermediate_values[s] for s in steps],
                mode="lines+markers",
                name=state,
                legendgroup=state,
                showlegend=state not in shown,
                line={"color": STATE_COLOURS.get(state, "#000000"), "width": 1.5},
                marker={
                    "size": [4] * (len(steps) - 1) + [10 if state == "PRUNED" else 4],
                    "symbol": ["circle"] * (len(steps) - 1)
                    + ["x" if state == "PRUNED" else "circle"],
                },
                hovertemplate=f"trial {t.number}<br>epoch %{{x}}<br>acc %{{y:.4f}}<extra></extra>",
            )
        )
        shown.add(state)
    fig.update_layout(
        title="Learning curves (x: where ASHA pruned a trial)",
        xaxis_title="epoch",
        yaxis_title="validation accuracy",
    )
    return fig


def leaderboard_figure(board: pd.DataFrame) -> go.Figure:
    """Mean validation and test accuracy over seeds, with their spread as error bars."""
    fig = go.Figure()
    for split, colour in (("val", "#1f77b4"), ("test", "#9467bd")):
        fig.add_trace(
            go.Bar(
                x=board["recipe"],
                y=board[f"{split}_mean"],
                name=f"{split} accuracy %",
                error_y={"type": "data", "array": board[f"{split}_sd"]},
                marker_color=colour,
            )
        )
    low = min(float((board[f"{s}_mean"] - board[f"{s}_sd"]).min()) for s in ("val", "test"))
    fig.update_layout(
        title=f"Promoted recipes and baselines at {board['epochs'].max()} epochs "
        "(mean ± sd over seeds)",
        barmode="group",
        yaxis_title="accuracy %",
        yaxis_range=[max(0.0, low - 2.0), 100.0],  # from 0 the differences would not show
    )
    return fig


def build_report(storage: BaseStorage, name: str) -> str:
    """The report's HTML text."""
    study = load_study(storage, name)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    sections: list[tuple[str, go.Figure | str]] = [
        ("Optimization history", plot_optimization_history(study)),
        ("Learning curves", learning_curves(study)),
    ]
    if len(complete) >= 2:
        sections.append(("Parallel coordinates", plot_parallel_coordinate(study)))
        try:
            with warnings.catch_warnings():
                # Optuna notes that a parameter only some trials sample (a `when`) has few
                # trials in some regime: true of every conditional space, and not the user's to fix
                warnings.filterwarnings("ignore", message="Some regimes", category=UserWarning)
                sections.append(("Parameter importances", plot_param_importances(study)))
        except (ValueError, RuntimeError) as err:  # e.g. no parameter varies among them
            sections.append(("Parameter importances", f"not available: {err}"))
    else:
        sections.append(
            ("Parallel coordinates and importances", "need at least two COMPLETE trials")
        )
    if promoted_name(name) in study_names(storage):
        promoted = optuna.load_study(study_name=promoted_name(name), storage=storage)
        board = leaderboard(promoted)
        sections.append(
            (
                "Promoted leaderboard",
                leaderboard_figure(board) if len(board) else "no promoted run has finished",
            )
        )
    searched = sorted(
        {p for t in study.trials for p in t.params if p.startswith(("distill.", "$"))}
    )
    for param in searched:
        if any(param in t.params for t in complete):
            sections.append((f"{param} against the metric", plot_slice(study, params=[param])))
    return _page(name, study, sections)


def _page(name: str, study: optuna.Study, sections: list[tuple[str, go.Figure | str]]) -> str:
    counts = {s: sum(t.state.name == s for t in study.trials) for s in STATE_COLOURS}
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    best = max(
        (t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None),
        key=lambda t: float(t.value or 0.0),
        default=None,
    )
    lines = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>kdsearch report: {html.escape(name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        " section{margin-bottom:2em}</style></head><body>",
        f"<h1>kdsearch study {html.escape(name)}</h1>",
        f"<p>{len(study.trials)} trials: {html.escape(summary)}.</p>",
    ]
    if best is not None:
        params = ", ".join(
            f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
            for k, v in best.params.items()
        )
        lines.append(
            f"<p>Best: trial {best.number}, validation accuracy {best.value:.4f} "
            f"({html.escape(params)}).</p>"
        )
    first = True
    for title, body in sections:
        lines.append(f"<section><h2>{html.escape(title)}</h2>")
        if isinstance(body, str):
            lines.append(f"<p>{html.escape(body)}</p>")
        else:
            lines.append(body.to_html(full_html=False, include_plotlyjs=first))
            first = False
        lines.append("</section>")
    lines.append("</body></html>")
    return "\n".join(lines)
