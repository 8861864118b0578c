"""An HTML report and pandas tables of a study.

The report is one self-contained file (plotly.js inline, no network needed to open it):
optimization history, learning curves coloured by state with ASHA's cuts, the failed trials
with their reasons, parallel coordinates, parameter importances, the promoted leaderboard with
seed spread, and each searched parameter against the metric. Accuracies are in percent, as the
CLI prints them.
"""

from __future__ import annotations

import html
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from typing import TypeAlias

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kdsearch.display import TRIAL_COLUMNS, seeds_cell, value_text
from kdsearch.errors import StudyError
from kdsearch.promote import failed_line, failed_runs, leaderboard
from kdsearch.study.contents import (
    is_promotion,
    load_study,
    promoted_study,
    ranked,
    recorded,
    space_config,
)
from kdsearch.study.drivers import left_running, searching_now

STATE_COLOURS = {
    "COMPLETE": "#2ca02c",
    "PRUNED": "#ff7f0e",
    "FAIL": "#d62728",
    "RUNNING": "#7f7f7f",
}
TITLE = "kdsearch report: "  # the page title's start: `report --out` replaces only such a file
ACCURACY = "validation accuracy %"
# Parallel coordinates and importances need this many COMPLETE trials, and a parameter this many
# COMPLETE trials that sampled it to be assessed: with fewer points neither shows a trend, and
# PED-ANOVA (Optuna's importances) ranks parameters on the best tenth of the trials.
MIN_COMPLETE = 5

Part: TypeAlias = "go.Figure | str"  # a figure, or a paragraph of text


def search_study(
    storage: BaseStorage, name: str, storage_option: Callable[[str], str] = lambda _: ""
) -> optuna.Study:
    """A study `kdsearch run` wrote; a promoted study or another tool's is a clear error, whose
    commands on a study carry its `storage_option` (` --storage URL` where it is needed)."""
    study = load_study(storage, name)
    if is_promotion(study.user_attrs):
        source = study.user_attrs["source_study"]
        raise StudyError(
            f"study {name!r} holds the promotion runs of study {source!r}: their leaderboard is "
            f"in `kdsearch report {source}{storage_option(source)}` and "
            f"`kdsearch trials {name}{storage_option(name)}`"
        )
    recorded(study, "space")
    return study


def check_single_objective(study: optuna.Study) -> None:
    """Refuse a study of several objectives (`kdsearch run` writes one)."""
    if len(study.directions) > 1:
        raise StudyError(
            f"study {study.study_name!r} has {len(study.directions)} objectives; kdsearch reads "
            "studies of one, as `kdsearch run` writes them"
        )


def trials_table(
    study: optuna.Study, *, by_value: bool = False, unsampled: bool = False
) -> pd.DataFrame:
    """One row per trial: number, state, value, epochs run, every parameter (`param_names`'
    order; with `unsampled`, the space's that no trial sampled too) and why it failed; by
    number, or `best_first`. A parameter named as another column (another tool's `epochs`) is
    `params_NAME`, as Optuna's own tables name them all."""
    check_single_objective(study)
    trials = best_first(study) if by_value else study.trials
    params = param_names(study, unsampled=unsampled)
    named: dict[str, str] = {}
    for param in params:
        column = param
        if column in TRIAL_COLUMNS:  # renamed to no other parameter's name
            column = f"params_{param}"
            while column in params or column in named.values():
                column = f"params_{column}"
        named[param] = column
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "epochs": t.user_attrs.get("epochs"),
            **{named[p]: v for p, v in t.params.items()},
            "failure": t.user_attrs.get("failure"),
        }
        for t in trials
    ]
    columns = ["number", "state", "value", "epochs", *named.values(), "failure"]
    table = pd.DataFrame(rows, columns=columns)
    for column in columns:  # pandas makes whole numbers floats (12.0) around a gap; keep them
        given = [row[column] for row in rows if row.get(column) is not None]
        if given and all(type(v) is int for v in given):
            table[column] = pd.array([row.get(column) for row in rows], dtype="Int64")
    return table


def best_first(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials best first (the study's direction), then the others by number: a pruned
    trial's value is its score at a shorter budget, which does not compare."""
    sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    complete.sort(key=lambda t: (sign * float(t.value or 0.0), t.number))
    return complete + [t for t in study.trials if t.state != TrialState.COMPLETE]


def param_names(study: optuna.Study, *, unsampled: bool = False) -> list[str]:
    """The parameters the trials sampled (with `unsampled`, and the space's that none did): in
    the space's order for a study of `kdsearch run`, then any others in the order they first
    appear."""
    names: list[str] = []
    if "space" in study.user_attrs:
        with suppress(StudyError):  # a space an earlier kdsearch recorded: the trials' order
            names = list(space_config(study).space)
    for t in study.trials:
        names += [p for p in t.params if p not in names]
    sampled = {p for t in study.trials for p in t.params}
    return [p for p in names if unsampled or p in sampled]


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
                y=[100 * t.intermediate_values[s] for s in steps],
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
                hovertemplate=f"trial {t.number}<br>epoch %{{x}}<br>acc %{{y:.2f}}%<extra></extra>",
            )
        )
        shown.add(state)
    fig.update_layout(
        title="Learning curves (x: where ASHA pruned a trial)",
        xaxis_title="epoch",
        yaxis_title=ACCURACY,
    )
    return fig


def leaderboard_figure(board: pd.DataFrame) -> go.Figure:
    """Mean validation and test accuracy over seeds, with their spread as error bars; each
    recipe is named with its seeds as the terminal's leaderboard counts them."""
    fig = go.Figure()
    names = [f"{row['recipe']}<br>seeds: {seeds_cell(row)}" for _, row in board.iterrows()]
    for split, colour in (("val", "#1f77b4"), ("test", "#9467bd")):
        fig.add_trace(
            go.Bar(
                x=names,
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
    """The report's HTML text; figures that would be empty are left out, and a line says why
    where the reader would look for them."""
    # here, not above: it imports SciPy through matplotlib, seconds that `trials` need not pay
    from optuna.visualization import plot_optimization_history, plot_slice

    study = search_study(storage, name)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    sections: list[tuple[str, list[Part]]] = []
    if complete:
        history = plot_optimization_history(study)
        for trace in history.data:  # in percent here: a `target` would drop the best-so-far line
            trace.y = [100 * y for y in trace.y]
        sections.append(("Optimization history", [history.update_yaxes(title_text=ACCURACY)]))
    if any(t.intermediate_values for t in study.trials):
        sections.append(("Learning curves", [learning_curves(study)]))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    if failed:
        reasons = [
            f"trial {t.number}: {t.user_attrs.get('failure', 'no reason recorded')}" for t in failed
        ]
        sections.append(("Failed trials", reasons))
    if complete:
        sections += _comparisons(study, complete)
    if (promoted := promoted_study(storage, name)) is not None:
        board = leaderboard(promoted)
        shown: Part = leaderboard_figure(board) if len(board) else "no promoted run has finished"
        lost = [failed_line(run) for run in failed_runs(promoted)]
        sections.append(("Promoted leaderboard", [shown, *lost]))
    for param in param_names(study):
        if any(param in t.params for t in complete):
            fig = plot_slice(study, params=[param], target=_accuracy, target_name=ACCURACY)
            sections.append((f"{param} against the metric", [fig]))
    # trials of a dead driver are taken over by a live one: left only where none searches
    left = [] if searching_now(storage, name) else left_running(storage, name, study.trials)
    return _page(name, study, sections, left)


def _accuracy(trial: FrozenTrial) -> float:
    return 100 * float(trial.value or 0.0)


def _comparisons(study: optuna.Study, complete: list[FrozenTrial]) -> list[tuple[str, list[Part]]]:
    """Parallel coordinates and parameter importances, or why they are not there (yet)."""
    if len(complete) < MIN_COMPLETE:
        why = f"from {MIN_COMPLETE} COMPLETE trials on; the study has {len(complete)}"
        return [("Parallel coordinates and parameter importances", [why])]
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import plot_parallel_coordinate, plot_param_importances

    parallel = plot_parallel_coordinate(study, target=_accuracy, target_name=ACCURACY)
    counts = Counter(p for t in complete for p in t.params)
    names = param_names(study)
    assessed = [p for p in names if counts[p] >= MIN_COMPLETE]
    few = [p for p in names if 0 < counts[p] < MIN_COMPLETE]
    importances: list[Part] = []
    if assessed:
        try:
            with warnings.catch_warnings():
                # Optuna notes that a parameter only some trials sample (a `when`) has few
                # trials in some regime: true of every conditional space, and not the user's to fix
                warnings.filterwarnings("ignore", message="Some regimes", category=UserWarning)
                importances.append(
                    plot_param_importances(
                        study, evaluator=PedAnovaImportanceEvaluator(), params=assessed
                    )
                )
        except (ValueError, RuntimeError) as err:  # e.g. no parameter varies among them
            importances.append(f"not available: {err}")
    if few:
        importances.append(
            f"not assessed, sampled by fewer than {MIN_COMPLETE} COMPLETE trials: " + ", ".join(few)
        )
    sections: list[tuple[str, list[Part]]] = [("Parallel coordinates", [parallel])]
    return sections + ([("Parameter importances", importances)] if importances else [])


def _page(
    name: str, study: optuna.Study, sections: list[tuple[str, list[Part]]], left: list[int]
) -> str:
    lines = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>{TITLE}{html.escape(name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        " section{margin-bottom:2em}</style></head><body>",
        f"<h1>kdsearch study {html.escape(name)}</h1>",
        f"<p>{html.escape(summary(study.trials, left))}</p>",
        f"<p>{html.escape(best_line(study))}</p>",
    ]
    first = True
    for title, parts in sections:
        lines.append(f"<section><h2>{html.escape(title)}</h2>")
        for part in parts:
            if isinstance(part, str):
                lines.append(f"<p>{html.escape(part)}</p>")
            else:
                lines.append(part.to_html(full_html=False, include_plotlyjs=first))
                first = False
        lines.append("</section>")
    lines.append("</body></html>")
    return "\n".join(lines)


def summary(trials: list[FrozenTrial], left: list[int]) -> str:
    """The trials by state ("5 trials: 3 complete, 1 pruned, 1 failed."), or that there are
    none; `left`, the RUNNING trials a search that stopped left (`left_running`), said so."""
    if not trials:
        return "The study holds no trial yet."
    counts = Counter(t.state.name for t in trials)
    states = ", ".join(
        f"{counts[s]} {'failed' if s == 'FAIL' else s.lower()}" for s in STATE_COLOURS if counts[s]
    )
    said = f"{len(trials)} trial{'s' if len(trials) > 1 else ''}: {states}."
    if left:
        marks = ", ".join(f"#{n}" for n in left)
        said += (
            f" The search stopped (Ctrl-C, or killed) and left {marks} RUNNING: the best trials "
            "here are the best so far, and `kdsearch trials` names the command that runs them "
            "again."
        )
    return said


def best_line(study: optuna.Study) -> str:
    """The best COMPLETE trial with its accuracy and parameters, or that there is none yet."""
    best = ranked(study.trials)
    if not best:
        return (
            "No COMPLETE trial yet (none has reached the full budget): there is no best recipe, "
            "and the figures that compare COMPLETE trials are left out."
        )
    trial = best[0]
    shown = [p for p in param_names(study) if p in trial.params]
    params = ", ".join(f"{p} = {value_text(trial.params[p])}" for p in shown)
    return f"Best: trial {trial.number}, validation accuracy {_accuracy(trial):.2f}% ({params})."
