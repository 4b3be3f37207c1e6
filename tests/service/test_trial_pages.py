"""service/trial_pages.py: the trials page as JSON, finished trials from a per-process cache.

What it sends must be, byte for byte, what FastAPI sent for the route's response_model from
jobs.job_trials_page, cold or warm, whatever the trials' states; a trial's JSON is kept only
once it can no longer change; reused ids never bring an old trial back; the cache is bounded.
On SQLite and PostgreSQL (the `backend` fixture).
"""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState
from pydantic import TypeAdapter

from service import jobs, scheduler, trial_pages, trial_store
from service.migrate import upgrade
from service.models import Job
from service.schemas import TrialsPublic
from service.settings import Settings
from service.trial_pages import ENTRY_OVERHEAD_BYTES, TrialJsonCache, page_body, trials_page

PAGE = TypeAdapter(TrialsPublic)
DISTS = {"lr": FloatDistribution(1e-5, 1.0, log=True), "batch": CategoricalDistribution(
    [16, 32, "full"]), "layers": IntDistribution(1, 4), "dropout": FloatDistribution(0, 0.5)}


@pytest.fixture
def db(backend):
    database = scheduler.open_database(Settings(database_url=backend.url), role="test")
    upgrade(database)
    database.storage  # creates Optuna's tables  # noqa: B018
    yield database
    database.dispose()


def _job(db, name: str = "job-1") -> tuple[int, optuna.Study]:
    study = optuna.create_study(study_name=name, storage=db.storage, direction="maximize")
    with db.session() as s:
        job = Job(owner="alice", name=name, spec={}, status="running", n_trials=50,
                  study_name=name)
        s.add(job)
        s.flush()
        return job.id, study


def _finished(study: optuna.Study, i: int, state: TrialState = TrialState.COMPLETE,
              value: float | None = None) -> None:
    t = study.ask(DISTS)
    for step, v in enumerate([0.1 * i, math.inf, -math.inf, math.nan, 0.5][: 2 + i % 4]):
        t.report(v, step)
    t.set_user_attr("stop_reason", "pruned" if state == TrialState.PRUNED else "max_epochs")
    t.set_user_attr("stopped_epoch", 3)
    t.set_user_attr("curves", {"val_loss": [0.5, None, 0.25]})
    t.set_user_attr("wild", [math.inf, -math.inf, math.nan, 1e-300, "x\u202e"])
    study.tell(t, value if state == TrialState.COMPLETE else None, state=state)


def _expected(db, job_id: int, after: int | None, limit: int) -> bytes:
    """What the route sent before: job_trials_page's dicts through FastAPI's response_model
    (TypeAdapter validate_python, then dump_json)."""
    rows, count, more = jobs.job_trials_page(db, None, job_id, after, limit)
    last = rows[-1]["number"] if more else None
    next_link = None if last is None else f"/next?after={last}&limit={limit}"
    return PAGE.dump_json(PAGE.validate_python(
        {"data": rows, "count": count, "next": next_link}, from_attributes=True), by_alias=True)


def _page(db, job_id: int, after: int | None, limit: int, cache: TrialJsonCache) -> bytes:
    data, count, last = trials_page(db, None, job_id, after, limit, cache)
    return page_body(data, count, None if last is None else f"/next?after={last}&limit={limit}")


def test_pages_are_the_bytes_the_response_model_sent(db):
    job_id, study = _job(db)
    for i in range(6):
        _finished(study, i, TrialState.PRUNED if i % 3 == 2 else TrialState.COMPLETE,
                  value=[0.5, 1e-7, 123456.789012345678][i % 3])
    failed = study.ask(DISTS)
    study.tell(failed, state=TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(
        study, trial_store.frozen_trial(study, failed))  # a WAITING retry of `failed`
    running = study.ask(DISTS)
    running.report(0.3, 0)
    cache = TrialJsonCache()
    for limit in (3, 100):
        after = None
        while True:
            cold = _page(db, job_id, after, limit, TrialJsonCache())
            assert cold == _expected(db, job_id, after, limit)
            assert _page(db, job_id, after, limit, cache) == cold  # filling the cache
            assert _page(db, job_id, after, limit, cache) == cold  # from the cache
            _, _, last = trials_page(db, None, job_id, after, limit, cache)
            if last is None:
                break
            after = last
    assert len(cache) == 6  # the finished trials; not the failed, waiting or running ones
    assert b'"retried_as":7' in _page(db, job_id, None, 100, cache)


def test_a_trial_is_kept_only_once_it_cannot_change(db):
    job_id, study = _job(db)
    cache = TrialJsonCache()
    running = study.ask(DISTS)
    running.report(0.25, 0)
    before = _page(db, job_id, None, 10, cache)
    running.report(0.5, 1)
    running.set_user_attr("stopped_epoch", 2)
    study.tell(running, 0.5)
    after = _page(db, job_id, None, 10, cache)
    assert after != before and after == _expected(db, job_id, None, 10)
    failed = study.ask(DISTS)
    study.tell(failed, state=TrialState.FAIL)
    assert b"retried_as" not in _page(db, job_id, None, 10, cache)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(
        study, trial_store.frozen_trial(study, failed))
    assert b'"retried_as":2' in _page(db, job_id, None, 10, cache)
    assert len(cache) == 1


def test_reused_ids_never_bring_an_old_trial_back(db):
    """SQLite hands a deleted study's ids out again: the same study id, trial ids and numbers
    in a study of the same name."""
    job_id, study = _job(db)
    cache = TrialJsonCache()
    t = study.ask({"lr": FloatDistribution(0.1, 0.2)})
    study.tell(t, 1.0)
    old = _page(db, job_id, None, 10, cache)
    optuna.delete_study(study_name="job-1", storage=db.storage)
    again = optuna.create_study(study_name="job-1", storage=db.storage, direction="maximize")
    t = again.ask({"lr": FloatDistribution(0.3, 0.4)})
    again.tell(t, 2.0)
    new = _page(db, job_id, None, 10, cache)
    assert new != old and new == _expected(db, job_id, None, 10)


def test_the_cache_is_bounded_by_bytes_least_recently_used_out_first():
    cache = TrialJsonCache(max_bytes=10 * (100 + ENTRY_OVERHEAD_BYTES))
    for i in range(1000):
        cache.put(i, b"x" * 100)
        if i >= 1:
            assert cache.get(1) is not None  # used again and again: never the oldest
    assert len(cache) == 10 and cache.bytes <= cache.max_bytes
    # Entry 1 and the nine newest stay; the rest went oldest first.
    assert [i for i in range(1000) if cache.get(i) is not None] == [1, *range(991, 1000)]
    cache.put("big", b"x" * cache.max_bytes)  # larger than the whole cache: not kept
    assert cache.get("big") is None and len(cache) == 10


def test_missing_jobs_studies_and_owners_answer_as_before(db):
    """As jobs.job_trials_page: another owner's job and a missing one are NotFound alike, a
    job without a study yet has no trials, a study deleted outside hptune is StudyMissing."""
    from service.errors import NotFound
    from service.jobs import StudyMissing

    job_id, study = _job(db)
    _finished(study, 1, value=0.5)
    cache = TrialJsonCache()
    assert trials_page(db, "alice", job_id, None, 10, cache)[1] == 1
    for owner, missing in [("bob", job_id), ("alice", 10**6), (None, 10**6)]:
        with pytest.raises(NotFound, match=f"no job {missing}"):
            trials_page(db, owner, missing, None, 10, cache)
        with pytest.raises(NotFound, match=f"no job {missing}"):
            jobs.job_trials_page(db, owner, missing, None, 10)
    with db.session() as s:
        bare = Job(owner="alice", name="bare", spec={}, status="queued", n_trials=1)
        s.add(bare)
        s.flush()
        bare_id = bare.id
    assert trials_page(db, "alice", bare_id, None, 10, cache) == ([], 0, None)
    assert jobs.job_trials_page(db, "alice", bare_id, None, 10) == ([], 0, False)
    optuna.delete_study(study_name="job-1", storage=db.storage)
    with pytest.raises(StudyMissing, match="no longer exists"):
        trials_page(db, "alice", job_id, None, 10, cache)
    with pytest.raises(StudyMissing, match="no longer exists"):
        jobs.job_trials_page(db, "alice", job_id, None, 10)


def test_a_cold_page_is_bounded_and_its_next_goes_on(db, monkeypatch):
    monkeypatch.setattr(trial_pages, "MAX_PRESENTED_PER_PAGE", 3)
    job_id, study = _job(db)
    for i in range(8):
        _finished(study, i, value=0.1 * i)
    running = study.ask(DISTS)  # never cached: counts against the bound on every read
    running.report(0.3, 0)
    cache = TrialJsonCache()
    data, count, last = trials_page(db, None, job_id, None, 100, cache)
    assert (len(data), count, last) == (3, 9, 2)  # three presented, then `next`
    data, _, last = trials_page(db, None, job_id, 2, 100, cache)
    assert (len(data), last) == (3, 5)
    seen = 6
    after = last
    while after is not None:
        data, _, after = trials_page(db, None, job_id, after, 100, cache)
        seen += len(data)
    assert seen == 9
    # Once presented, the finished trials come from the cache: one full page, no `next`.
    data, _, last = trials_page(db, None, job_id, None, 100, cache)
    assert (len(data), last) == (9, None)
    assert page_body(data, 9, None) == _expected(db, job_id, None, 100)
