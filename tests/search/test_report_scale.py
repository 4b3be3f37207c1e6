"""The report and pictures of a 10,000-trial job are bounded in what they draw and list, and
the JSON report and the CSV still hold every trial (benchmarks/report_scale.py times them).

The trials are the benchmark's (benchmarks.report_scale.synthetic_trial: every outcome, shaped
as search.runner.run_trial records them), handed to the functions as the service hands them
the trials it read page by page."""

from __future__ import annotations

import base64
import csv
import io
import random
import re
from collections import Counter
from datetime import datetime

import optuna
import pytest
from matplotlib.collections import LineCollection, PathCollection

from benchmarks.report_scale import spec, synthetic_trial
from search.plot_trials import (
    BEST_CURVES,
    MAX_CURVES,
    MAX_IMPORTANCE_TRIALS,
    MAX_POINTS,
    best_first,
    outcome,
    pick,
    thin,
)
from search.plots import PLOTS, render_figure
from search.report import build_report
from search.report_csv import render_csv
from search.report_html import STOPPED_ROWS, render_html

N = 10_000


@pytest.fixture(scope="module")
def job():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("spec", spec(N).model_dump(mode="json"))
    rng, start = random.Random(7), datetime(2025, 1, 1)
    trials = [synthetic_trial(i, rng, start) for i in range(N)]
    return study, trials, build_report(study, spec(N), {"id": 1, "name": "big"}, trials=trials)


def test_the_json_report_lists_every_stopped_trial(job):
    _, trials, report = job
    stopped = {t.number for t in trials if t.user_attrs["stop_reason"] != "max_epochs"}
    assert len(stopped) > 0.7 * N
    assert [r["number"] for r in report["stopped_trials"]] == sorted(stopped)
    states = Counter(t.state.name for t in trials)
    assert report["counts"]["complete"] == states["COMPLETE"]
    assert report["counts"]["pruned"] == states["PRUNED"]
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert report["best_trial"]["number"] == best.number


def test_the_csv_has_a_row_per_trial(job):
    study, trials, _ = job
    rows = list(csv.DictReader(io.StringIO(render_csv(study, trials=trials))))
    assert [int(r["number"]) for r in rows] == list(range(N))


def test_the_html_lists_a_bounded_table_of_the_closest_stopped_trials(job):
    study, trials, report = job
    page = render_html(report, study, trials=trials)
    stopped = page[page.index('<section id="stopped">'):]
    listed = [int(n) for n in re.findall(r'<tr id="trial-(\d+)">', stopped)]
    assert len(listed) == STOPPED_ROWS
    assert page.count("<tr") < STOPPED_ROWS + 30  # with the summary tables
    # Those that reached the best values, best first.
    reached = {r["number"]: r["value"] if r["value"] is not None
               else r["details"].get("best_value") for r in report["stopped_trials"]}
    expected = sorted((n for n, v in reached.items() if v is not None),
                      key=lambda n: (-reached[n], n))[:STOPPED_ROWS]
    assert listed == expected
    assert f"The {STOPPED_ROWS} of {len(reached):,} that reached the best values" in stopped
    # Four pictures of a bounded size: the page is as big at 10,000 trials as at a few
    # hundred (each picture a 1000 x 600 PNG of at most MAX_POINTS markers).
    pngs = [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([^\"]+)", page)]
    assert len(pngs) == len(PLOTS) and all(len(p) < 600_000 for p in pngs)
    assert len(page) < 3_000_000


def _segments(fig) -> int:
    return sum(len(c.get_segments()) for ax in fig.axes for c in ax.collections
               if isinstance(c, LineCollection))


def _markers(fig) -> int:
    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections
               if isinstance(c, PathCollection))


def test_learning_curves_draw_the_best_and_a_sample(job):
    study, trials, _ = job
    fig = render_figure(study, "learning_curves", trials=trials)
    assert _segments(fig) == MAX_CURVES
    # Those of the best BEST_CURVES trials and an even sample of the others, a collection
    # per outcome; the legend counts every trial.
    (ax,) = fig.axes
    drawn = Counter(outcome(t) for t in pick(trials, MAX_CURVES, BEST_CURVES, best_first(True)))
    assert sorted(len(c.get_segments()) for c in ax.collections
                  if isinstance(c, LineCollection)) == sorted(drawn.values())
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    pruned = sum(outcome(t) == "pruned" for t in trials)
    assert f"pruned ({pruned})" in labels
    assert f"of {N:,} trials; {MAX_CURVES} drawn" in fig.get_suptitle()
    assert ax.get_lines()  # the best trial's thick line


def test_history_and_lr_vs_batch_draw_a_bounded_number_of_markers(job):
    study, trials, _ = job
    finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert finished > MAX_POINTS
    history = render_figure(study, "history", trials=trials)
    assert MAX_POINTS <= _markers(history) <= MAX_POINTS + MAX_POINTS // 4
    step = history.axes[0].get_lines()[0]  # best so far: through the improvements only
    assert len(step.get_xdata()) < 100
    lr = render_figure(study, "lr_vs_batch", trials=trials)
    assert MAX_POINTS <= _markers(lr) <= MAX_POINTS + 1  # and the best trial's ring


def test_importances_weigh_an_even_sample_of_the_completed_trials(job, monkeypatch):
    study, trials, _ = job
    weighed = []
    real = optuna.importance.get_param_importances

    def spy(s, **kw):
        weighed.append(s.get_trials(deepcopy=False))
        return real(s, **kw)

    monkeypatch.setattr(optuna.importance, "get_param_importances", spy)
    fig = render_figure(study, "importances", trials=trials)
    (sample,) = weighed
    completed = sorted(t.value for t in trials if t.state.name == "COMPLETE")
    assert len(completed) > MAX_IMPORTANCE_TRIALS == len(sample)
    # Even by value: the sample's quartiles are the whole's.
    values = sorted(t.value for t in sample)
    for q in (0.25, 0.5, 0.75):
        assert values[int(q * len(values))] == pytest.approx(
            completed[int(q * len(completed))], abs=0.01)
    assert "an even sample by value" in fig.get_suptitle()


def test_thin_and_pick():
    assert thin(list(range(10)), 20) == list(range(10))
    assert thin(list(range(101)), 5) == [0, 25, 50, 75, 100]
    got = pick(list(range(100)), 10, 3, key=lambda i: -i)
    assert len(got) == 10 and {97, 98, 99} <= set(got) and got == sorted(got) and 0 in got
