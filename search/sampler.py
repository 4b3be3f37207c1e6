"""TPE whose cost per trial does not grow with the job: it models a bounded view of the study.

Optuna's TPESampler reads and models every earlier trial on every ask, so a 10,000-trial job
spends most of its time sampling (benchmarks/RESULTS_sampler.md). `WindowedTPESampler` runs
the very same TPE on a view of the study that holds at most

- the `best` best COMPLETE trials and the `best` best PRUNED trials (ranked as TPE ranks
  them), so TPE's "good" group, which never holds more than 25 trials, is exactly the one it
  would build from the whole study;
- the `recent` most recent finished trials (by number), which make the "bad" group (TPE
  already weighs older trials less) and keep TPE's gamma at its cap: with at least 241
  finished trials in view gamma(n) = min(ceil(0.1 n), 25) is 25, as for the whole study;
- the `running` most recent RUNNING trials, the constant liar's "bad" points.

A study no larger than the window is seen whole, so the sampler then suggests exactly what
TPESampler would with the same seed (tests/search/test_sampler_window.py checks it).

Where the view comes from is injectable: `history(study, window)` returns its trials. The
default (`public_history`) reads the study through Optuna's public API and selects in memory
(bounding what TPE fits on); the service passes service.trial_store.BoundedHistory, which
reads only the view from the database and keeps it incrementally (bounding the read too).
Only public Optuna names are used here: the view is served to TPE by a read-only storage.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

# What TPE reads: finished trials to model, running ones for the constant liar.
VIEW_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
# Upper bound of each window size: a view is meant to be small (and a typo not a memory bomb).
MAX_WINDOW = 100_000
# The study name the view is served under (its storage holds no other).
_VIEW_NAME = "hptune-sampler-view"


@dataclass(frozen=True)
class Window:
    """How many trials of each kind a sampler's view holds (see the module docstring)."""

    # Best COMPLETE and best PRUNED trials, each: at least TPE's largest "good" group (25).
    best: int = 25
    # Most recent finished trials: at least 241 keeps TPE's gamma at its cap.
    recent: int = 300
    # Most recent RUNNING trials (the constant liar's); about one per busy worker.
    running: int = 300

    def __post_init__(self) -> None:
        for name, low in (("best", 1), ("recent", 1), ("running", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"window {name} must be an int, got {value!r}")
            if not low <= value <= MAX_WINDOW:
                raise ValueError(f"window {name} must be in [{low}, {MAX_WINDOW}], got {value}")


HistorySource = Callable[[optuna.Study, Window], Sequence[FrozenTrial]]


def pruned_score(trial: FrozenTrial, maximize: bool) -> tuple[float, float]:
    """How TPE ranks a PRUNED trial (lower is better): the later its last step the better,
    then its value at that step; NaN last, a trial without reports after every other."""
    if not trial.intermediate_values:
        return 1.0, 0.0
    step, value = max(trial.intermediate_values.items())
    if math.isnan(value):
        return -step, math.inf
    return -step, -value if maximize else value


def select_view(trials: Iterable[FrozenTrial], maximize: bool, window: Window
                ) -> list[FrozenTrial]:
    """The trials of `trials` a sampler's view holds, in number order (see Window).

    Each part is a top-k by a fixed key (ties: the lower number first, as TPE's stable sorts
    rank them), so the view of a union is the view of the union of views: a source may keep
    only the last view and what is new since.
    """
    complete: list[FrozenTrial] = []
    pruned: list[FrozenTrial] = []
    running: list[FrozenTrial] = []
    for t in trials:
        if t.state == TrialState.COMPLETE:
            complete.append(t)
        elif t.state == TrialState.PRUNED:
            pruned.append(t)
        elif t.state == TrialState.RUNNING:
            running.append(t)
    sign = -1.0 if maximize else 1.0
    chosen = [
        *heapq.nsmallest(window.best, complete, key=lambda t: (sign * t.value, t.number)),
        *heapq.nsmallest(window.best, pruned, key=lambda t: (pruned_score(t, maximize), t.number)),
        *heapq.nlargest(window.recent, complete + pruned, key=lambda t: t.number),
        *heapq.nlargest(window.running, running, key=lambda t: t.number),
    ]
    return sorted({t.number: t for t in chosen}.values(), key=lambda t: t.number)


def public_history(study: optuna.Study, window: Window) -> list[FrozenTrial]:
    """The view, selected in memory from the study's trials read through Optuna's public API
    (an RDB study's cache reads each finished trial from the database once per process).
    A multi-objective study has no single ranking: its view is every trial.

    Read as TPE reads them: through Study's own get_trials, past a pruner's wrapper study
    (Hyperband's bracket study filters only its get_trials, which TPE does not use).
    """
    trials = optuna.Study.get_trials(study, deepcopy=False, states=VIEW_STATES)
    if len(study.directions) > 1:
        return trials
    return select_view(trials, study.direction == StudyDirection.MAXIMIZE, window)


class WindowedTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPESampler (same options, same seed behaviour) fitted on a bounded view.

    A TPESampler subclass, so whatever knows TPE still recognises it; every sampling call goes
    to TPESampler's own public methods, given a read-only study that holds the view. The view
    is read once per trial (at its first sampling call) from `history`.
    """

    def __init__(self, *, window: Window | None = None, history: HistorySource | None = None,
                 **tpe_options: Any) -> None:
        super().__init__(**tpe_options)
        window = window or Window()
        # TPE counts its startup trials in what it sees: the view must be able to hold them.
        n_startup = int(tpe_options.get("n_startup_trials", 10))
        self.window = replace(window, recent=min(max(window.recent, n_startup), MAX_WINDOW))
        self.history: HistorySource = history or public_history
        # The view of the trial being sampled: (its number, the view as a study).
        self._window_view: tuple[int, optuna.Study] | None = None
        # The trials of the last view TPE sampled from (read by tests and benchmarks).
        self.last_view: tuple[FrozenTrial, ...] = ()

    def _view_of(self, study: optuna.Study, trial: FrozenTrial) -> optuna.Study:
        view = self._window_view
        if view is not None and view[0] == trial.number:
            return view[1]
        trials = tuple(self.history(study, self.window))
        storage = _ViewStorage(trials, list(study.directions))
        view_study = optuna.load_study(study_name=_VIEW_NAME, storage=storage, sampler=self)
        self._window_view = (trial.number, view_study)
        self.last_view = trials
        return view_study

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._window_view = None
        super().before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        return super().infer_relative_search_space(self._view_of(study, trial), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return super().sample_relative(self._view_of(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return super().sample_independent(self._view_of(study, trial), trial, param_name,
                                          param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._window_view = None
        super().after_trial(study, trial, state, values)


def _read_only(*_args: Any, **_kwargs: Any) -> Any:
    raise NotImplementedError("a sampler's view of a study is read-only")


class _ViewStorage(optuna.storages.BaseStorage):
    """One study holding a fixed list of trials, served to TPE; writes are refused, except the
    constant liar's note of a running trial's jointly sampled parameters, which is dropped:
    the trial's own suggest calls record those parameters (in hptune, all of them before
    `ask` returns and the job's claim lock lets another worker ask)."""

    def __init__(self, trials: Sequence[FrozenTrial], directions: list[StudyDirection]):
        self._trials = sorted(trials, key=lambda t: t.number)
        self._directions = directions

    def get_study_id_from_name(self, study_name: str) -> int:
        if study_name != _VIEW_NAME:
            raise KeyError(study_name)
        return 0

    def get_study_name_from_id(self, study_id: int) -> str:
        return _VIEW_NAME

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return list(self._directions)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return {}

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return {}

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        pass

    create_new_study = delete_study = set_study_user_attr = set_study_system_attr = _read_only
    get_all_studies = create_new_trial = set_trial_param = _read_only
    get_trial_id_from_study_id_trial_number = set_trial_state_values = _read_only
    set_trial_intermediate_value = set_trial_user_attr = get_trial = _read_only
