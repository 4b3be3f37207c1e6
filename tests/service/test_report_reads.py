"""What a report, CSV or picture request reads: every trial of the job's study, page by page
(service.reports.job_trials), equal to Optuna's own trials but for the per-epoch `curves`
that nothing of a report reads; the garbage collector restored afterwards."""

from __future__ import annotations

import gc
import random
import threading
from datetime import datetime
from types import SimpleNamespace

import optuna
import pytest

from benchmarks.report_scale import add_trials, synthetic_trial
from service import reports
from service.db import Database
from service.jobs import StudyMissing
from service.settings import Settings


@pytest.fixture(scope="module")
def db_study(tmp_path_factory):
    """A study of 2,017 trials, built once: the tests only read it."""
    url = f"sqlite:///{tmp_path_factory.mktemp('reads') / 'reads.db'}"
    study = optuna.create_study(storage=url, study_name="job-1", direction="maximize")
    storage = optuna.storages.RDBStorage(url)
    rng, start = random.Random(3), datetime(2025, 1, 1)
    n = 2 * reports.REPORT_PAGE + 17
    add_trials(storage, study, [synthetic_trial(i, rng, start) for i in range(n)])
    storage.engine.dispose()
    db = Database(Settings(database_url=url))
    yield db, study
    db.dispose()


def test_a_report_reads_every_trial_page_by_page(db_study, monkeypatch):
    db, study = db_study
    pages = []
    real = reports.trial_store.read_page

    def counted(*args):
        page = real(*args)
        pages.append(len(page.trials))
        return page

    monkeypatch.setattr(reports.trial_store, "read_page", counted)
    read = reports.job_trials(db, SimpleNamespace(id=1, study_name="job-1"))
    assert pages == [reports.REPORT_PAGE, reports.REPORT_PAGE, 17]
    expected = study.get_trials(deepcopy=False)
    assert len(read) == len(expected)
    for got, want in zip(read, expected, strict=True):
        attrs = dict(want.user_attrs)
        assert attrs.pop("curves") and "curves" not in got.user_attrs
        assert (got.number, got.state, got.values, got.params, got.intermediate_values,
                got.datetime_start, got.datetime_complete, got.user_attrs) == (
            want.number, want.state, want.values, want.params, want.intermediate_values,
            want.datetime_start, want.datetime_complete, attrs)


def test_a_gone_study_is_a_404(db_study):
    db, _ = db_study
    with pytest.raises(StudyMissing):
        reports.job_trials(db, SimpleNamespace(id=2, study_name="job-2"))


def test_the_collector_is_paused_while_reading_and_restored_after():
    assert gc.isenabled()
    inside, outer_done = threading.Event(), threading.Event()

    def other_read():
        with reports._gc_paused():
            inside.set()
            outer_done.wait(10)
        # The first read out leaves it paused for the other; the last restores it.

    worker = threading.Thread(target=other_read)
    with reports._gc_paused():
        assert not gc.isenabled()
        worker.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other read is still under way
    outer_done.set()
    worker.join(10)
    assert gc.isenabled()
    gc.disable()
    try:  # a collector that was off stays off
        with reports._gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
