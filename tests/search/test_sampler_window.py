"""search/sampler.py: TPE on a bounded view of the study (and the service's bounded read of it,
service.trial_store.BoundedHistory).

What must hold: below the window the sampler is plain TPE (same suggestions, same seed); above
it, what TPE reads and fits on stays within the window however long the job, the best trials
are always in view, and the constant liar still spreads parallel asks. No timings here:
benchmarks/sampler_scale.py measures the cost.
"""

from __future__ import annotations

import math
import random

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from benchmarks.report_scale import add_trials
from search import JobSpec, build_sampler, create_study
from search.sampler import Window, WindowedTPESampler, public_history, select_view
from tests.service.conftest import pg_server  # noqa: F401  (the session's PostgreSQL; fails under CI)

optuna.logging.set_verbosity(optuna.logging.ERROR)

TPE_OPTIONS = {"seed": 7, "n_startup_trials": 8, "multivariate": True, "constant_liar": True}
SPACE = {"x": FloatDistribution(-5, 5), "lr": FloatDistribution(1e-4, 1.0, log=True),
         "bs": CategoricalDistribution([16, 32, 64])}
SMALL = Window(best=5, recent=40, running=3)


def _objective(trial: optuna.Trial) -> float:
    """Core params, a conditional one (define-by-run: TPE's independent path) and pruning."""
    x = trial.suggest_float("x", -5, 5)
    lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
    bs = trial.suggest_categorical("bs", [16, 32, 64])
    if bs == 16:
        trial.suggest_float("momentum", 0.0, 0.99)
    for step in range(3):
        trial.report(-(x - 1) ** 2 - step, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return -(x - 1) ** 2 - math.log10(lr) ** 2 / 4 - (bs == 64)


def _suggest(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -5, 5)
    trial.suggest_float("lr", 1e-4, 1.0, log=True)
    trial.suggest_categorical("bs", [16, 32, 64])
    return -(x - 1) ** 2


def _optimize(sampler: optuna.samplers.BaseSampler, n: int, hyperband: bool = False
              ) -> list[dict]:
    # A fixed study name: Hyperband puts trials into brackets by a hash of it.
    pruner = (optuna.pruners.HyperbandPruner(max_resource=3) if hyperband
              else optuna.pruners.MedianPruner(n_startup_trials=4))
    study = optuna.create_study(study_name="s", direction="maximize", sampler=sampler,
                                pruner=pruner)
    study.enqueue_trial({"x": 0.0, "lr": 0.01, "bs": 32})  # a warm start, as jobs queue one
    study.optimize(_objective, n_trials=n)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("hyperband", [False, True], ids=["median", "hyperband-brackets"])
def test_below_the_window_it_suggests_exactly_what_plain_tpe_does(hyperband):
    plain = _optimize(optuna.samplers.TPESampler(**TPE_OPTIONS), 60, hyperband)
    windowed = _optimize(WindowedTPESampler(**TPE_OPTIONS), 60, hyperband)
    assert windowed == plain
    # The window matters once the study outgrows it (so the comparison above can fail).
    small = _optimize(WindowedTPESampler(window=Window(best=3, recent=12), **TPE_OPTIONS), 60,
                      hyperband)
    assert small[:13] == plain[:13] and small != plain


def test_the_jobs_default_sampler_is_windowed_tpe_with_the_specs_settings():
    spec = JobSpec(sampler={"name": "tpe", "seed": 4, "n_startup_trials": 12})
    sampler = build_sampler(spec, seed_offset=3)
    assert isinstance(sampler, WindowedTPESampler)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    plain = optuna.samplers.TPESampler(seed=(4 * 1_000_003 + 3) % 2**32, n_startup_trials=12,
                                       multivariate=True, constant_liar=True)
    assert _optimize(sampler, 30) == _optimize(plain, 30)


def test_the_window_holds_the_startup_trials():
    """TPE counts its startup trials in what it sees: a window smaller than that is widened,
    so the sampler leaves its random start after n_startup_trials, as plain TPE does."""
    options = {**TPE_OPTIONS, "n_startup_trials": 20}
    sampler = WindowedTPESampler(window=Window(best=2, recent=5), **options)
    assert sampler.window.recent == 20
    # Trial 0 is queued, 1-20 random; trial 20 is TPE's first (with 5 trials in view it would
    # still be random), and the last the window holds whole.
    windowed = _optimize(sampler, 21)
    assert windowed == _optimize(optuna.samplers.TPESampler(**options), 21)


def _big_study(n: int, storage: optuna.storages.BaseStorage | None = None,
               direction: str = "maximize", name: str | None = None) -> optuna.Study:
    """`n` finished trials (COMPLETE, PRUNED with reports, some FAIL), the best ones among the
    oldest, ties and infinities included; then 2 RUNNING and 1 WAITING trial."""
    rng = random.Random(0)
    study = optuna.create_study(storage=storage, study_name=name, direction=direction)
    good = 1.0 if direction == "maximize" else -1.0
    trials = []
    for i in range(n):
        params = {"x": rng.uniform(-5, 5), "lr": 10 ** rng.uniform(-4, 0), "bs": 32}
        kind = i % 5
        if kind == 4:
            trials.append(create_trial(state=TrialState.FAIL, params=params, distributions=SPACE))
            continue
        if kind in (0, 1):
            value = good * (100.0 + (i % 7)) if i < 60 else rng.choice([round(rng.random(), 1),
                                                                        -good * math.inf])
            value = good * math.inf if i == 1 else value
            trials.append(create_trial(params=params, distributions=SPACE, value=value))
            continue
        steps = {s: (math.nan if i % 11 == 0 else round(rng.random(), 1))
                 for s in range(rng.choice([0, 1, 3]))}
        trials.append(create_trial(state=TrialState.PRUNED, params=params, distributions=SPACE,
                                   intermediate_values=steps))
    if isinstance(storage, optuna.storages.RDBStorage):
        for number, trial in enumerate(trials):
            trial.number = number
        add_trials(storage, study, trials)  # one bulk insert: through Optuna, one by one
    else:
        study.add_trials(trials)
    for _ in range(2):
        study.ask(SPACE)
    study.enqueue_trial({"x": 1.0})
    return study


def _numbers(trials: list[FrozenTrial]) -> list[int]:
    return [t.number for t in trials]


def _top_complete(study: optuna.Study, k: int) -> set[int]:
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    return {t.number for t in complete[:k]}


def test_on_a_3000_trial_study_tpe_fits_on_the_window_and_always_sees_the_best():
    study = _big_study(3000)
    reads: list[int] = []

    def counting(s: optuna.Study, window: Window) -> list[FrozenTrial]:
        view = public_history(s, window)
        reads.append(len(view))
        return view

    window = Window()
    study.sampler = WindowedTPESampler(history=counting, window=window, **TPE_OPTIONS)
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, _suggest(trial))
    bound = 2 * window.best + window.recent + window.running
    assert len(reads) == 3 and max(reads) <= bound < 3000
    view = study.sampler.last_view
    seen = set(_numbers(list(view)))
    assert _top_complete(study, window.best) <= seen  # the best trials are all old ones
    running = {t.number for t in study.get_trials(states=(TrialState.RUNNING,))}
    assert running - {trial.number} <= seen  # the constant liar's points
    finished = [t for t in view if t.state.is_finished()]
    assert len(finished) >= 241  # TPE's gamma stays at its cap of 25, as for all 3000


def test_select_view_keeps_best_pruned_as_tpe_ranks_them():
    """Fewer COMPLETE trials than TPE's good group: its rest comes from PRUNED trials, ranked
    by last step, then value; those must be in view however old."""
    trials = [create_trial(state=TrialState.PRUNED, params={"x": 0.0},
                           distributions={"x": SPACE["x"]},
                           intermediate_values={0: 0.1 * i, **({5: 0.2} if i < 3 else {})})
              for i in range(100)]
    for n, t in enumerate(trials):
        t.number = n
    view = select_view(trials, maximize=True, window=Window(best=3, recent=10, running=0))
    assert _numbers(view) == [0, 1, 2, *range(90, 100)]
    view = select_view(trials, maximize=False, window=Window(best=4, recent=1, running=0))
    assert _numbers(view) == [0, 1, 2, 3, 99]


def test_constant_liar_spreads_parallel_asks_beyond_the_window():
    """Workers ask while others' trials run: each sees those as bad points and goes elsewhere.
    Same seed each time, so without the liar all asks would be the same point."""
    window = Window(best=5, recent=40, running=10)
    for liar in (True, False):
        study = _big_study(400)
        study.ask()  # the queued trial, whose x is fixed
        asked = []
        for _ in range(4):
            study.sampler = WindowedTPESampler(
                window=window, **{**TPE_OPTIONS, "constant_liar": liar})
            asked.append(tuple(sorted(study.ask(SPACE).params.items())))
        assert len(set(asked)) == (4 if liar else 1), (liar, asked)
    study.sampler = WindowedTPESampler(window=SMALL, **TPE_OPTIONS)
    current = study.ask(SPACE)
    running = [t.number for t in study.sampler.last_view if t.state == TrialState.RUNNING]
    # The cap holds: the most recent running trials (the one being asked among them).
    assert running == list(range(current.number - SMALL.running + 1, current.number + 1))


@pytest.mark.parametrize("bad", [{"best": 0}, {"recent": 10**9}, {"running": -1},
                                 {"recent": True}, {"best": 2.5}, {"recent": "300"}])
def test_window_rejects_hostile_sizes(bad):
    with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
        Window(**bad)


# --- the service's read: only the view from the database, then only what changed ----------

@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    from service.db import Database
    from service.settings import Settings

    url = f"sqlite:///{tmp_path / 'h.db'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_server").create_database()
    database = Database(Settings(database_url=url), role="test")
    yield database
    database.dispose()


def _history_view(db, study: optuna.Study, window: Window):
    from service.trial_store import BoundedHistory

    history = BoundedHistory(db, study.study_name)
    loaded_study = optuna.load_study(study_name=study.study_name, storage=db.storage)
    return history, loaded_study, history(loaded_study, window)


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_bounded_history_reads_the_view_by_sql_then_only_what_changed(db, direction):
    # 25x and 7x the window.
    n = 1000 if direction == "maximize" and db.settings.is_sqlite else 300
    study = _big_study(n, db.storage, direction, name=f"big-{direction}")
    history, study, view = _history_view(db, study, SMALL)
    maximize = direction == "maximize"
    expected = select_view(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                     TrialState.RUNNING)), maximize, SMALL)
    assert _numbers(view) == _numbers(expected)
    assert history.last_loaded == len(view) <= 2 * SMALL.best + SMALL.recent + SMALL.running
    # Then: the queued trial runs and finishes at the top, one trial fails, two new finish.
    waiting = study.ask()  # pops the WAITING trial
    study.tell(waiting, 1e6 if maximize else -1e6)
    study.tell(study.ask(SPACE), state=TrialState.FAIL)
    for value in (0.5, 0.25):
        study.tell(study.ask(SPACE), value)
    running = study.ask(SPACE)
    view = history(study, SMALL)
    expected = select_view(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                     TrialState.RUNNING)), maximize, SMALL)
    assert _numbers(view) == _numbers(expected)
    assert waiting.number in _numbers(view) and running.number in _numbers(view)
    # Read: the 3 trials unfinished then, the 3 created since that TPE reads (not the FAIL).
    assert history.last_loaded == 3 + 3
    assert history.loaded <= 2 * SMALL.best + SMALL.recent + SMALL.running + 6 < n // 5


def test_bounded_history_is_plain_tpe_below_the_window(db):
    """The service's path (SQL view, incremental) suggests what plain TPE does."""
    spec = JobSpec(sampler={"name": "tpe", "seed": 1, "n_startup_trials": 5})
    from service.trial_store import BoundedHistory

    runs = {}
    for name in ("plain", "sql"):
        create_study(spec, db.storage, name, {})
        study = optuna.load_study(study_name=name, storage=db.storage)
        history = BoundedHistory(db, name) if name == "sql" else None
        for i in range(25):
            study.sampler = build_sampler(spec, i, history=history)
            trial = study.ask()
            study.tell(trial, _suggest(trial))
        runs[name] = [t.params for t in study.trials]
    assert runs["sql"] == runs["plain"]


def test_the_worker_hands_its_history_to_each_trials_new_sampler(db):
    from service.scheduler import Claim
    from service.trial_store import BoundedHistory
    from service.worker import Worker

    spec = JobSpec(n_trials=5)
    create_study(spec, db.storage, "job-9", {})
    worker = Worker(db, name="w")
    first = worker._study(Claim(job_id=9, spec=spec, study_name="job-9", claim_number=0))
    history = first.sampler.history
    again = worker._study(Claim(job_id=9, spec=spec, study_name="job-9", claim_number=1))
    assert again is first and isinstance(history, BoundedHistory)
    assert again.sampler.history is history  # a new sampler (new seed), the same history
