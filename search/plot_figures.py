"""The four report pictures, each drawn on a Matplotlib figure from a study snapshot."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter
from optuna.trial import FrozenTrial, TrialState

from search.plot_trials import (
    BEST_COLOUR,
    BEST_CURVES,
    BEST_POINTS,
    MAX_CURVES,
    MAX_IMPORTANCE_TRIALS,
    MAX_POINTS,
    NO_VALUE_COLOUR,
    STYLE,
    Snapshot,
    best_first,
    curve,
    finite,
    importances,
    outcome,
    param,
    pick,
    reached,
    thin,
)
from trainer.vocab import StopReason


def message(fig: Figure, title: str, text: str) -> None:
    """A figure that says why there is nothing to plot, instead of an empty frame."""
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.58, title, ha="center", va="center", fontsize=20, color="#333333",
            transform=ax.transAxes)
    ax.text(0.5, 0.42, text, ha="center", va="center", fontsize=12, color="#666666",
            transform=ax.transAxes, wrap=True)


def _legend(fig: Figure, title: str | None = None) -> None:
    """The legend right of the axes, or below them where the figure is too narrow for that."""
    if fig.get_figwidth() >= 8.0:
        legend = fig.legend(loc="outside right upper", title=title, fontsize=9)
    else:
        legend = fig.legend(loc="outside lower center", title=title, fontsize=9, ncols=2,
                            frameon=False)
    # Curves are faint when there are many; their legend keys must not be.
    for handle in legend.legend_handles:
        handle.set_alpha(1.0)
        if isinstance(handle, Line2D):
            handle.set_linewidth(max(handle.get_linewidth(), 2.0))


def _label(reason: str, n: int) -> str:
    return f"{STYLE[reason][1]} ({n})"


def _short(v: float) -> str:
    return f"{v:.4g}"


def _drawn(n_drawn: int, n: int, what: str) -> str:
    """What a title adds when a picture draws a sample: "; 300 drawn: ..." or nothing."""
    return "" if n_drawn >= n else f"; {n_drawn:,} drawn: the best and an even sample {what}"


def _learning_curves(fig: Figure, snap: Snapshot) -> None:
    reported = [t for t in snap.trials
                if any(finite(v) for v in t.intermediate_values.values())]
    if not reported:
        message(fig, "no epochs reported yet",
                "Learning curves appear once trials report their first epoch.")
        return
    totals = Counter(outcome(t) for t in reported)
    groups: dict[str, list[np.ndarray]] = {}
    drawn = pick(reported, MAX_CURVES, BEST_CURVES, best_first(snap.maximize))
    for t in drawn:
        groups.setdefault(outcome(t), []).append(curve(t, snap.examples_per_epoch))
    ax = fig.add_subplot()
    n = len(reported)
    # Many overlapping curves read better faint; a handful read better solid.
    alpha = min(0.85, max(0.2, 4.0 / math.sqrt(len(drawn))))
    for reason in STYLE:
        curves = groups.get(reason)
        if not curves:
            continue
        colour = STYLE[reason][0]
        ax.add_collection(LineCollection(curves, colors=colour, linewidths=1.2, alpha=alpha,
                                         label=_label(reason, totals[reason])), autolim=True)
        if reason in (StopReason.PRUNED, StopReason.DIVERGED):
            # Where a stopped trial ended, so short curves are not mistaken for noise.
            ends = np.array([c[-1] for c in curves])
            marker = "x" if reason == StopReason.PRUNED else "v"
            ax.scatter(ends[:, 0], ends[:, 1], marker=marker,
                       color=colour, s=22, alpha=min(1.0, alpha + 0.2), linewidths=1.2,
                       zorder=3)
    if snap.best is not None:
        pts = curve(snap.best, snap.examples_per_epoch)
        if len(pts):
            ax.plot(pts[:, 0], pts[:, 1], color=BEST_COLOUR, linewidth=3.2, zorder=4,
                    label=f"best: trial #{snap.best.number} ({_short(snap.best.value)})")
    ax.autoscale_view()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(snap.x_unit)
    ax.set_ylabel(snap.metric)
    fig.suptitle(f"Learning curves: {snap.metric} of {n:,} trials"
                 + _drawn(len(drawn), n, "of the others"))
    ax.grid(alpha=0.3)
    _legend(fig, title="trial outcome")


def _history(fig: Figure, snap: Snapshot) -> None:
    finished = [t for t in snap.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in snap.trials if t.state == TrialState.FAIL]
    valued = [(t, v) for t in finished if (v := reached(t, snap.maximize)) is not None]
    if not valued:
        message(fig, "no finished trials yet",
                f"The history appears once a trial completes ({len(snap.trials)} so far).")
        return
    totals = Counter(outcome(t) for t, _ in valued)
    drawn = pick(valued, MAX_POINTS, BEST_POINTS,
                 lambda tv: (-tv[1] if snap.maximize else tv[1], tv[0].number))
    points: dict[str, list[tuple[int, float]]] = {}
    for t, v in drawn:
        points.setdefault(outcome(t), []).append((t.number, v))
    ax = fig.add_subplot()
    markers = {StopReason.PRUNED: "x", StopReason.DIVERGED: "v"}
    for reason in STYLE:
        pts = points.get(reason)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        label = _label(reason, totals[reason])
        if reason in markers:
            label += ", best value before stop"
        marker = markers.get(reason, "o")
        ax.scatter(xs, ys, color=STYLE[reason][0], marker=marker, s=30,
                   edgecolors="white" if marker == "o" else None, linewidths=0.5 if
                   marker == "o" else 1.3, label=label, zorder=3)
    done = sorted((t for t in finished if t.state == TrialState.COMPLETE and finite(t.value)),
                  key=lambda t: t.number)
    if done:
        _best_so_far(ax, done, snap)
    if failed:
        # Failed trials have no value: a rug along the bottom shows when they happened (an
        # even sample of them: a tick a few pixels wide hides its neighbours anyway).
        rug = thin(failed, MAX_POINTS // 4)
        ax.scatter([t.number for t in rug], [0.02] * len(rug), marker="|", s=120,
                   color=STYLE[StopReason.FAILED][0], transform=ax.get_xaxis_transform(),
                   label=f"failed / cancelled ({len(failed)})", zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(snap.metric)
    fig.suptitle(f"Optimisation history ({'higher' if snap.maximize else 'lower'} is better)"
                 + _drawn(len(drawn), len(valued), "of the finished trials"))
    ax.grid(alpha=0.3)
    _legend(fig)


def _best_so_far(ax: Any, done: list[FrozenTrial], snap: Snapshot) -> None:
    """The best value so far as a step line, drawn through the trials that improved it."""
    best = np.maximum.accumulate if snap.maximize else np.minimum.accumulate
    xs = np.array([t.number for t in done])
    ys = best(np.array([t.value for t in done], dtype=float))
    keep = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    xs, ys = list(xs[keep]), list(ys[keep])
    last = max(t.number for t in snap.trials)
    if last > xs[-1]:
        xs.append(last)
        ys.append(ys[-1])
    ax.step(xs, ys, where="post", color=BEST_COLOUR, linewidth=2, label="best so far",
            zorder=4)


def _importances_plot(fig: Figure, snap: Snapshot) -> None:
    completed = [t for t in snap.trials if t.state == TrialState.COMPLETE]
    try:
        imp = importances(snap.study, completed)
    except ValueError as exc:
        message(fig, "parameter importances unavailable", str(exc))
        return
    names = list(imp)[::-1]  # barh draws bottom-up; the largest goes on top
    values = [imp[n] for n in names]
    ax = fig.add_subplot()
    bars = ax.barh(names, values, color=STYLE[StopReason.MAX_EPOCHS][0], height=0.6)
    ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], padding=4, fontsize=11)
    ax.set_xlim(0, max(max(values) * 1.15, 0.05))
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel(f"share of importance for {snap.metric}")
    n = sum(1 for t in completed if finite(t.value))
    weighed = min(n, MAX_IMPORTANCE_TRIALS)
    over = (f"{n:,} completed trials" if weighed == n
            else f"an even sample by value of {weighed:,} of {n:,} completed trials")
    fig.suptitle(f"Parameter importances (PED-ANOVA over {over})")
    ax.tick_params(axis="y", labelsize=11)
    ax.grid(axis="x", alpha=0.3)


def _lr_batch_rows(snap: Snapshot) -> list[tuple[FrozenTrial, float, int, float | None]]:
    """(trial, learning rate, batch size, value reached) of each finished trial having both."""
    rows = []
    for t in snap.trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        lr, bs = param(t, "learning_rate"), param(t, "batch_size")
        if lr is not None and lr > 0 and bs is not None:
            rows.append((t, lr, int(bs), reached(t, snap.maximize)))
    return rows


def _lr_batch_kind(t: FrozenTrial) -> str | None:
    """How learning rate against batch size marks a trial: completed, pruned or diverged."""
    if t.state == TrialState.COMPLETE:
        return "completed"
    return {StopReason.PRUNED: "pruned", StopReason.DIVERGED: "diverged"}.get(outcome(t))


def _no_lr_vs_batch(fig: Figure, snap: Snapshot) -> None:
    """Why there is no learning rate against batch size to draw."""
    if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in snap.trials):
        message(fig, "no learning rate or batch size",
                "No finished trial records both a learning rate and a batch size.")
    else:
        message(fig, "no finished trials yet",
                "Learning rate against batch size appears once a trial finishes.")


def _lr_vs_batch(fig: Figure, snap: Snapshot) -> None:
    every = _lr_batch_rows(snap)
    if not every:
        _no_lr_vs_batch(fig, snap)
        return
    rank = best_first(snap.maximize)
    rows = pick(every, MAX_POINTS, BEST_POINTS, lambda r: rank(r[0]))
    totals = Counter(_lr_batch_kind(r[0]) for r in every)
    ax = fig.add_subplot()
    sizes = sorted({bs for _, _, bs, _ in every})
    pos = {bs: i for i, bs in enumerate(sizes)}
    values = [v for *_, v in every if v is not None]
    norm = Normalize(min(values), max(values)) if values else Normalize(0.0, 1.0)
    # Yellow means better whichever the direction.
    cmap = colormaps["viridis" if snap.maximize else "viridis_r"]

    def y(t: FrozenTrial, bs: int) -> float:
        # A fixed, per-trial jitter keeps trials with the same batch size apart.
        return pos[bs] + ((t.number * 0.618034) % 1.0 - 0.5) * 0.35

    handles = []
    for label, marker in (("completed", "o"), ("pruned", "X"), ("diverged", "v")):
        sel = [r for r in rows if _lr_batch_kind(r[0]) == label]
        if not sel:
            continue
        xs = [lr for _, lr, _, _ in sel]
        ys = [y(t, bs) for t, _, bs, _ in sel]
        colours = [cmap(norm(v)) if v is not None else NO_VALUE_COLOUR for *_, v in sel]
        ax.scatter(xs, ys, c=colours, marker=marker, s=70 if marker == "o" else 60,
                   edgecolors="#333333", linewidths=0.6, zorder=3)
        handles.append(Line2D([], [], linestyle="", marker=marker, markersize=8,
                              markerfacecolor="#DDDDDD", markeredgecolor="#333333",
                              label=f"{label} ({totals[label]:,})"))
    if snap.best is not None:
        for t, lr, bs, _ in every:
            if t.number == snap.best.number:
                ax.scatter([lr], [y(t, bs)], s=260, facecolors="none", edgecolors=BEST_COLOUR,
                           linewidths=2.2, zorder=4)
                handles.append(Line2D([], [], linestyle="", marker="o", markersize=13,
                                      markerfacecolor="none", markeredgecolor=BEST_COLOUR,
                                      markeredgewidth=2, label=f"best: trial #{t.number}"))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_ylim(-0.6, len(sizes) - 0.4)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("batch size")
    fig.suptitle("Learning rate against batch size, coloured by value"
                 + _drawn(len(rows), len(every), "of the finished trials"))
    ax.grid(alpha=0.3)
    label = snap.metric if not values else f"{snap.metric} (stopped trials: best before stop)"
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label, pad=0.01)
    # One row of legend where the figure is wide enough, two otherwise.
    wide = fig.get_figwidth() >= 7.5
    fig.legend(handles=handles, loc="outside lower center", fontsize=9, frameon=False,
               ncols=len(handles) if wide else min(2, len(handles)))


DRAW: dict[str, Callable[[Figure, Snapshot], None]] = {
    "learning_curves": _learning_curves,
    "history": _history,
    "importances": _importances_plot,
    "lr_vs_batch": _lr_vs_batch,
}
