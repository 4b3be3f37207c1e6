"""Report pictures of a job's study as PNG bytes.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so
rendering keeps no global state and may run in several threads at once. What a plot reads
from the study is in search.plot_trials, how each plot is drawn in search.plot_figures.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from search.plot_figures import DRAW, message
from search.plot_trials import Snapshot, importances, snapshot

PLOTS = ("learning_curves", "history", "importances", "lr_vs_batch")

# Accepted picture sizes, in pixels.
MIN_PX = 200
MAX_PX = 4000

# The look is designed on a 1000 x 600 px canvas at 100 dpi; other sizes scale the dpi so text
# and lines keep their proportions.
_BASE_W_PX = 1000
_BASE_H_PX = 600
_BASE_DPI = 100.0


def render_png(study: optuna.Study, name: str, width_px: int = 1000,
               height_px: int = 600, *, trials: Sequence[FrozenTrial] | None = None) -> bytes:
    """One plot of `study` as a PNG of exactly `width_px` x `height_px` pixels; `trials` are
    the study's when the caller has read them already."""
    return render_pngs(study, (name,), width_px, height_px, trials=trials)[name]


def render_pngs(study: optuna.Study, names: Iterable[str] = PLOTS, width_px: int = 1000,
                height_px: int = 600, *, trials: Sequence[FrozenTrial] | None = None
                ) -> dict[str, bytes]:
    """Several plots of `study` from one read of its trials, keyed by plot name."""
    names = tuple(names)
    _check(names, width_px, height_px)
    snap = snapshot(study, trials)
    return {n: _png(_figure(DRAW[n], snap, width_px, height_px)) for n in names}


def render_figure(study: optuna.Study, name: str, width_px: int = 1000,
                  height_px: int = 600, *, trials: Sequence[FrozenTrial] | None = None
                  ) -> Figure:
    """One plot of `study` as a Matplotlib figure (for notebooks, or to inspect)."""
    _check((name,), width_px, height_px)
    return _figure(DRAW[name], snapshot(study, trials), width_px, height_px)


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Importance of each searched parameter for the objective, summing to 1, largest first.

    Uses Optuna's PED-ANOVA evaluator (deterministic) over the COMPLETE trials (at most
    search.plot_trials.MAX_IMPORTANCE_TRIALS of them: an even sample by value). Raises
    ValueError, with a reason a person can read, when importances cannot say anything: fewer than
    two completed trials, or fewer than two parameters that vary.
    """
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return importances(study, trials)


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


def _figure(draw: Callable[[Figure, Snapshot], None], snap: Snapshot, width_px: int,
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
        message(fig, "no trials yet", "The study has no trials to draw.")
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" chunk: the same study gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
