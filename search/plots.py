"""Report pictures of a job's study as PNG bytes.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so
rendering keeps no global state and may run in several threads at once.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import optuna
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from search.report import stop_reason
from search.spec import CORE_PARAMS
from trainer.vocab import StopReason

PLOTS = ("learning_curves", "history", "importances", "lr_vs_batch")

# Accepted picture sizes, in pixels.
MIN_PX = 200
MAX_PX = 4000

# The look is designed on a 1000 x 600 px canvas at 100 dpi; other sizes scale the dpi so text
# and lines keep their proportions.
_BASE_W_PX = 1000
_BASE_H_PX = 600
_BASE_DPI = 100.0

RUNNING = "running"

# One colour per outcome, shared by every plot (Okabe-Ito: readable with colour blindness).
_STYLE: dict[str, tuple[str, str]] = {
    StopReason.MAX_EPOCHS: ("#0072B2", "completed (max epochs)"),
    StopReason.EARLY_STOPPED: ("#009E73", "early-stopped"),
    StopReason.PRUNED: ("#E69F00", "pruned"),
    StopReason.DIVERGED: ("#D55E00", "diverged"),
    StopReason.FAILED: ("#666666", "failed"),
    StopReason.CANCELLED: ("#AAAAAA", "cancelled"),
    RUNNING: ("#CC79A7", "running"),
}
_BEST_COLOUR = "#111111"
_NO_VALUE_COLOUR = "#BBBBBB"


@dataclass(frozen=True)
class _Snapshot:
    """The study read once: every plot of one request draws from the same trials."""

    study: optuna.Study
    trials: list[FrozenTrial]
    metric: str
    maximize: bool
    best: FrozenTrial | None
    # Training examples per epoch where the pruner counts steps in examples, else None.
    examples_per_epoch: float | None
    # What the learning curves' x values count: "epoch", or "examples seen" where a study counted
    # in examples has no finished trial yet to tell how many make an epoch.
    x_unit: str


def render_png(study: optuna.Study, name: str, width_px: int = 1000,
               height_px: int = 600) -> bytes:
    """One plot of `study` as a PNG of exactly `width_px` x `height_px` pixels."""
    return render_pngs(study, (name,), width_px, height_px)[name]


def render_pngs(study: optuna.Study, names: Iterable[str] = PLOTS, width_px: int = 1000,
                height_px: int = 600) -> dict[str, bytes]:
    """Several plots of `study` from one read of its trials, keyed by plot name."""
    names = tuple(names)
    _check(names, width_px, height_px)
    snap = _snapshot(study)
    return {n: _png(_figure(_DRAW[n], snap, width_px, height_px)) for n in names}


def render_figure(study: optuna.Study, name: str, width_px: int = 1000,
                  height_px: int = 600) -> Figure:
    """One plot of `study` as a Matplotlib figure (for notebooks, or to inspect)."""
    _check((name,), width_px, height_px)
    return _figure(_DRAW[name], _snapshot(study), width_px, height_px)


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Importance of each searched parameter for the objective, summing to 1, largest first.

    Uses Optuna's PED-ANOVA evaluator (deterministic) over the COMPLETE trials. Raises
    ValueError, with a reason a person can read, when importances cannot say anything: fewer than
    two completed trials, or fewer than two parameters that vary.
    """
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return _importances(study, trials)


# --- helpers -----------------------------------------------------------------------------------


def _check(names: tuple[str, ...], width_px: int, height_px: int) -> None:
    unknown = [n for n in names if n not in PLOTS]
    if unknown:
        raise ValueError(f"unknown plot name(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(PLOTS)}")
    _check_px("width_px", width_px)
    _check_px("height_px", height_px)


def _check_px(arg: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{arg} must be an integer number of pixels, got {value!r}")
    if not MIN_PX <= value <= MAX_PX:
        raise ValueError(f"{arg} must lie in [{MIN_PX}, {MAX_PX}] pixels, got {value}")


def _snapshot(study: optuna.Study) -> _Snapshot:
    trials = study.get_trials(deepcopy=False)
    spec = study.user_attrs.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
    best = None
    if done:
        best = (max if maximize else min)(done, key=lambda t: t.value)
    examples_per_epoch, x_unit = None, "epoch"
    if (spec.get("pruner") or {}).get("resource") == "examples":
        examples_per_epoch = _examples_per_epoch(trials)
        x_unit = "epoch" if examples_per_epoch else "examples seen"
    return _Snapshot(study, trials, spec.get("metric") or "objective value", maximize, best,
                     examples_per_epoch, x_unit)


def _examples_per_epoch(trials: list[FrozenTrial]) -> float | None:
    """The training set's size, from the finished trial that saw the most examples.

    Trials record the examples they saw and the (rounded) epochs that makes; the trial that saw
    the most gives the closest ratio, and the size is a whole number of rows. Audited trials
    are left out: their epochs_trained is where the pruner stopped them, not what they saw.
    """
    seen = [(t.user_attrs["examples_seen"], t.user_attrs.get("epochs_trained"))
            for t in trials
            if t.user_attrs.get("examples_seen") and not t.user_attrs.get("audited")]
    seen = [(n, e) for n, e in seen if _finite(e) and e > 0]
    if not seen:
        return None
    n, epochs = max(seen)
    return float(round(n / epochs))


def _figure(draw: Callable[[Figure, _Snapshot], None], snap: _Snapshot, width_px: int,
            height_px: int) -> Figure:
    scale = min(width_px / _BASE_W_PX, height_px / _BASE_H_PX)
    dpi = _BASE_DPI * min(max(scale, 0.4), 4.0)
    # Agg truncates the canvas to whole pixels, and Matplotlib before 3.10 did so without a
    # tolerance: a hundredth of a pixel more keeps float rounding in px / dpi * dpi from
    # losing one (403 x 600, for one).
    fig = Figure(figsize=((width_px + 0.01) / dpi, (height_px + 0.01) / dpi), dpi=dpi,
                 layout="constrained")
    FigureCanvasAgg(fig)
    if snap.trials:
        draw(fig, snap)
    else:
        _message(fig, "no trials yet", "The study has no trials to draw.")
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" chunk: the same study gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _message(fig: Figure, title: str, text: str) -> None:
    """A figure that says why there is nothing to plot, instead of an empty frame."""
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.58, title, ha="center", va="center", fontsize=20, color="#333333",
            transform=ax.transAxes)
    ax.text(0.5, 0.42, text, ha="center", va="center", fontsize=12, color="#666666",
            transform=ax.transAxes, wrap=True)


def _finite(v: float | None) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _reason(t: FrozenTrial) -> str:
    reason = stop_reason(t)
    if reason in _STYLE:
        return reason
    if t.state in (TrialState.RUNNING, TrialState.WAITING):
        return RUNNING
    if t.state == TrialState.COMPLETE:
        return StopReason.MAX_EPOCHS
    return StopReason.FAILED if t.state == TrialState.FAIL else StopReason.PRUNED


def _curve(t: FrozenTrial, examples_per_epoch: float | None = None) -> np.ndarray:
    """The trial's (step, monitored value) points with non-finite values dropped; steps in
    examples become (fractional) epochs where `examples_per_epoch` is given."""
    pts = [(s, v) for s, v in sorted(t.intermediate_values.items()) if _finite(v)]
    pts = np.asarray(pts, dtype=float).reshape(-1, 2)
    if examples_per_epoch:
        pts[:, 0] /= examples_per_epoch
    return pts


def _reached(t: FrozenTrial, maximize: bool) -> float | None:
    """A trial's value, or for a stopped one the best value it reached before stopping."""
    if t.state == TrialState.COMPLETE and _finite(t.value):
        return float(t.value)
    best = t.user_attrs.get("best_value")
    if _finite(best):
        return float(best)
    ys = _curve(t)[:, 1]
    if ys.size == 0:
        return None
    return float(ys.max() if maximize else ys.min())


def _param(t: FrozenTrial, name: str) -> float | None:
    """A sampled parameter, or the value the job fixed it at."""
    v = t.params.get(name, t.user_attrs.get(f"fixed_{name}"))
    return float(v) if _finite(v) else None


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
    return f"{_STYLE[reason][1]} ({n})"


def _short(v: float) -> str:
    return f"{v:.4g}"


# --- the plots ---------------------------------------------------------------------------------


def _learning_curves(fig: Figure, snap: _Snapshot) -> None:
    groups: dict[str, list[np.ndarray]] = {}
    for t in snap.trials:
        pts = _curve(t, snap.examples_per_epoch)
        if len(pts):
            groups.setdefault(_reason(t), []).append(pts)
    if not groups:
        _message(fig, "no epochs reported yet",
                 "Learning curves appear once trials report their first epoch.")
        return
    ax = fig.add_subplot()
    n = sum(len(g) for g in groups.values())
    # Many overlapping curves read better faint; a handful read better solid.
    alpha = min(0.85, max(0.2, 4.0 / math.sqrt(n)))
    for reason in _STYLE:
        curves = groups.get(reason)
        if not curves:
            continue
        colour = _STYLE[reason][0]
        ax.add_collection(LineCollection(curves, colors=colour, linewidths=1.2, alpha=alpha,
                                         label=_label(reason, len(curves))), autolim=True)
        if reason in (StopReason.PRUNED, StopReason.DIVERGED):
            # Where a stopped trial ended, so short curves are not mistaken for noise.
            ends = np.array([c[-1] for c in curves])
            marker = "x" if reason == StopReason.PRUNED else "v"
            ax.scatter(ends[:, 0], ends[:, 1], marker=marker,
                       color=colour, s=22, alpha=min(1.0, alpha + 0.2), linewidths=1.2,
                       zorder=3)
    if snap.best is not None:
        pts = _curve(snap.best, snap.examples_per_epoch)
        if len(pts):
            ax.plot(pts[:, 0], pts[:, 1], color=_BEST_COLOUR, linewidth=3.2, zorder=4,
                    label=f"best: trial #{snap.best.number} ({_short(snap.best.value)})")
    ax.autoscale_view()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(snap.x_unit)
    ax.set_ylabel(snap.metric)
    fig.suptitle(f"Learning curves: {snap.metric} of {n} trials")
    ax.grid(alpha=0.3)
    _legend(fig, title="trial outcome")


def _history(fig: Figure, snap: _Snapshot) -> None:
    finished = [t for t in snap.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in snap.trials if t.state == TrialState.FAIL]
    points: dict[str, list[tuple[int, float]]] = {}
    for t in finished:
        v = _reached(t, snap.maximize)
        if v is not None:
            points.setdefault(_reason(t), []).append((t.number, v))
    if not points:
        _message(fig, "no finished trials yet",
                 f"The history appears once a trial completes ({len(snap.trials)} so far).")
        return
    ax = fig.add_subplot()
    markers = {StopReason.PRUNED: "x", StopReason.DIVERGED: "v"}
    for reason in _STYLE:
        pts = points.get(reason)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        label = _label(reason, len(pts))
        if reason in markers:
            label += ", best value before stop"
        marker = markers.get(reason, "o")
        ax.scatter(xs, ys, color=_STYLE[reason][0], marker=marker, s=30,
                   edgecolors="white" if marker == "o" else None, linewidths=0.5 if
                   marker == "o" else 1.3, label=label, zorder=3)
    done = sorted((t for t in finished if t.state == TrialState.COMPLETE and _finite(t.value)),
                  key=lambda t: t.number)
    if done:
        best = np.maximum.accumulate if snap.maximize else np.minimum.accumulate
        xs = [t.number for t in done]
        ys = list(best(np.array([t.value for t in done], dtype=float)))
        last = max(t.number for t in snap.trials)
        if last > xs[-1]:
            xs.append(last)
            ys.append(ys[-1])
        ax.step(xs, ys, where="post", color=_BEST_COLOUR, linewidth=2, label="best so far",
                zorder=4)
    if failed:
        # Failed trials have no value: a rug along the bottom shows when they happened.
        ax.scatter([t.number for t in failed], [0.02] * len(failed), marker="|", s=120,
                   color=_STYLE[StopReason.FAILED][0], transform=ax.get_xaxis_transform(),
                   label=f"failed / cancelled ({len(failed)})", zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(snap.metric)
    fig.suptitle(f"Optimisation history ({'higher' if snap.maximize else 'lower'} is better)")
    ax.grid(alpha=0.3)
    _legend(fig)


def _importances(study: optuna.Study, completed: list[FrozenTrial]) -> dict[str, float]:
    completed = [t for t in completed if _finite(t.value)]
    if len(completed) < 2:
        raise ValueError(f"importances need at least 2 completed trials; "
                         f"this study has {len(completed)}")
    varying = sorted({name for t in completed for name, d in t.distributions.items()
                      if not d.single()})
    if len(varying) < 2:
        only = f" ({varying[0]})" if varying else ""
        raise ValueError(f"importances compare 2 or more searched parameters; "
                         f"this study searches {len(varying)}{only}")
    order = {p: i for i, p in enumerate(CORE_PARAMS)}
    varying.sort(key=lambda p: (order.get(p, len(order)), p))
    return optuna.importance.get_param_importances(
        study, evaluator=PedAnovaImportanceEvaluator(), params=varying)


def _importances_plot(fig: Figure, snap: _Snapshot) -> None:
    completed = [t for t in snap.trials if t.state == TrialState.COMPLETE]
    try:
        imp = _importances(snap.study, completed)
    except ValueError as exc:
        _message(fig, "parameter importances unavailable", str(exc))
        return
    names = list(imp)[::-1]  # barh draws bottom-up; the largest goes on top
    values = [imp[n] for n in names]
    ax = fig.add_subplot()
    bars = ax.barh(names, values, color=_STYLE[StopReason.MAX_EPOCHS][0], height=0.6)
    ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], padding=4, fontsize=11)
    ax.set_xlim(0, max(max(values) * 1.15, 0.05))
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel(f"share of importance for {snap.metric}")
    n = sum(1 for t in completed if _finite(t.value))
    fig.suptitle(f"Parameter importances (PED-ANOVA over {n} completed trials)")
    ax.tick_params(axis="y", labelsize=11)
    ax.grid(axis="x", alpha=0.3)


def _lr_vs_batch(fig: Figure, snap: _Snapshot) -> None:
    rows = []
    for t in snap.trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        lr, bs = _param(t, "learning_rate"), _param(t, "batch_size")
        if lr is not None and lr > 0 and bs is not None:
            rows.append((t, lr, int(bs), _reached(t, snap.maximize)))
    if not rows:
        if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in snap.trials):
            _message(fig, "no learning rate or batch size",
                     "No finished trial records both a learning rate and a batch size.")
        else:
            _message(fig, "no finished trials yet",
                     "Learning rate against batch size appears once a trial finishes.")
        return
    ax = fig.add_subplot()
    sizes = sorted({bs for _, _, bs, _ in rows})
    pos = {bs: i for i, bs in enumerate(sizes)}
    values = [v for *_, v in rows if v is not None]
    norm = Normalize(min(values), max(values)) if values else Normalize(0.0, 1.0)
    # Yellow means better whichever the direction.
    cmap = colormaps["viridis" if snap.maximize else "viridis_r"]

    def y(t: FrozenTrial, bs: int) -> float:
        # A fixed, per-trial jitter keeps trials with the same batch size apart.
        return pos[bs] + ((t.number * 0.618034) % 1.0 - 0.5) * 0.35

    kinds = (("completed", "o", lambda t: t.state == TrialState.COMPLETE),
             ("pruned", "X", lambda t: _reason(t) == StopReason.PRUNED),
             ("diverged", "v", lambda t: _reason(t) == StopReason.DIVERGED))
    handles = []
    for label, marker, keep in kinds:
        sel = [r for r in rows if keep(r[0])]
        if not sel:
            continue
        xs = [lr for _, lr, _, _ in sel]
        ys = [y(t, bs) for t, _, bs, _ in sel]
        colours = [cmap(norm(v)) if v is not None else _NO_VALUE_COLOUR for *_, v in sel]
        ax.scatter(xs, ys, c=colours, marker=marker, s=70 if marker == "o" else 60,
                   edgecolors="#333333", linewidths=0.6, zorder=3)
        handles.append(Line2D([], [], linestyle="", marker=marker, markersize=8,
                              markerfacecolor="#DDDDDD", markeredgecolor="#333333",
                              label=f"{label} ({len(sel)})"))
    if snap.best is not None:
        for t, lr, bs, _ in rows:
            if t.number == snap.best.number:
                ax.scatter([lr], [y(t, bs)], s=260, facecolors="none", edgecolors=_BEST_COLOUR,
                           linewidths=2.2, zorder=4)
                handles.append(Line2D([], [], linestyle="", marker="o", markersize=13,
                                      markerfacecolor="none", markeredgecolor=_BEST_COLOUR,
                                      markeredgewidth=2, label=f"best: trial #{t.number}"))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_ylim(-0.6, len(sizes) - 0.4)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("batch size")
    fig.suptitle("Learning rate against batch size, coloured by value")
    ax.grid(alpha=0.3)
    label = snap.metric if not values else f"{snap.metric} (stopped trials: best before stop)"
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label, pad=0.01)
    # One row of legend where the figure is wide enough, two otherwise.
    wide = fig.get_figwidth() >= 7.5
    fig.legend(handles=handles, loc="outside lower center", fontsize=9, frameon=False,
               ncols=len(handles) if wide else min(2, len(handles)))


_DRAW: dict[str, Callable[[Figure, _Snapshot], None]] = {
    "learning_curves": _learning_curves,
    "history": _history,
    "importances": _importances_plot,
    "lr_vs_batch": _lr_vs_batch,
}
