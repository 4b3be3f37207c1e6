"""The HTML and CSV reports, rendered from real studies in a real SQLite file."""

import base64
import csv
import io
import math
import re
import struct
from datetime import datetime
from html.parser import HTMLParser

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from search.plots import PLOTS
from search.report import build_report
from search.report_csv import render_csv
from search.report_html import render_html
from search.spec import JobSpec

DISTS = {
    "learning_rate": FloatDistribution(1e-4, 0.3, log=True),
    "batch_size": CategoricalDistribution([16, 32, 64, 128, 256]),
    "dropout": FloatDistribution(0.0, 0.6),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}
MAX_EPOCHS = 10
EVIL_NAME = "<script>alert(1)</script>"
EVIL_ERROR = 'ValueError: <img src=x onerror="alert(2)"> & more'

# (stop_reason, epochs trained) of each trial, in trial-number order.
TRIALS = [
    ("max_epochs", MAX_EPOCHS),
    ("pruned", 3),
    ("early_stopped", 7),
    ("diverged", 2),
    ("max_epochs", MAX_EPOCHS),
    ("failed", 1),
    ("pruned", 1),
    ("early_stopped", 6),
    ("cancelled", 4),
    ("pruned", 2),
]
STOPPED = {n for n, (reason, _) in enumerate(TRIALS) if reason != "max_epochs"}


@pytest.fixture
def storage(tmp_path):
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")


def _spec(**kw):
    return JobSpec.model_validate({"name": "formats", "max_epochs": MAX_EPOCHS,
                                   "n_trials": len(TRIALS), **kw})


def _params(i, fixed=()):
    p = {"learning_rate": 10 ** (-4 + (i * 0.37) % 3), "batch_size": [16, 32, 64, 128, 256][i % 5],
         "dropout": round((i * 0.13) % 0.6, 3), "weight_decay": 10 ** (-6 + (i * 0.71) % 4)}
    return {k: v for k, v in p.items() if k not in fixed}


def _build(storage, fixed: dict | None = None) -> optuna.Study:
    """A study holding every kind of outcome, as search.study.run_trial records them."""
    fixed = fixed or {}
    study = optuna.create_study(storage=storage, study_name="job-3", direction="maximize")
    study.set_user_attr("spec", _spec().model_dump(mode="json"))
    for i, (reason, epochs) in enumerate(TRIALS):
        ceiling = 0.7 + 0.03 * i
        iv = {e: ceiling * (1 - math.exp(-0.4 * e)) for e in range(1, epochs + 1)}
        best_epoch = max(iv, key=iv.get)
        attrs = {"stop_reason": reason, "stopped_epoch": epochs, "best_epoch": best_epoch,
                 "epoch_seconds": 0.25, "train_seconds": 0.25 * epochs + i / 1000,
                 "best_value": iv[best_epoch], "curves": {"val_accuracy": list(iv.values())},
                 **{f"fixed_{k}": v for k, v in fixed.items()}}
        state, value = TrialState.PRUNED, None
        if reason in ("max_epochs", "early_stopped"):
            state, value = TrialState.COMPLETE, iv[best_epoch]
            attrs.update(test_accuracy=value - 0.02, test_loss=0.5)
            if reason == "early_stopped":
                attrs.update(patience=3, min_delta=0.0)
        elif reason == "pruned":
            attrs.update(pruner="successive_halving", prune_step=epochs, prune_value=iv[epochs],
                         prune_cutoff=iv[epochs] + 0.1, prune_n_peers=4, prune_rung=0)
        elif reason == "diverged":
            attrs.update(diverged_epoch=epochs + 1, diverged_loss="nan",
                         stopped_epoch=epochs + 1)
        else:
            state = TrialState.FAIL
            if reason == "failed":
                attrs["error"] = EVIL_ERROR
        params = _params(i, fixed)
        study.add_trial(optuna.create_trial(
            state=state, value=value, params=params,
            distributions={k: DISTS[k] for k in params}, user_attrs=attrs,
            intermediate_values=iv))
    return study


def _job(**kw):
    return {"id": 3, "name": EVIL_NAME, "owner": "alice", "status": "succeeded",
            "n_trials": len(TRIALS), **kw}


class _Refs(HTMLParser):
    """Every src/href attribute of the page, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "action")]


def _parse(page: str) -> _Refs:
    parser = _Refs()
    parser.feed(page)
    parser.close()
    return parser


def _resource_refs(page: str) -> list[str]:
    return _parse(page).refs


# --- HTML ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The study, its report and its page, shared read-only by the HTML tests."""
    path = tmp_path_factory.mktemp("formats") / "s.db"
    study = _build(optuna.storages.RDBStorage(f"sqlite:///{path}"))
    report = build_report(study, _spec(), _job())
    return study, report, render_html(report, study)


@pytest.fixture
def page(built):
    return built[2]


def test_html_is_one_self_contained_page(page):
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    refs = _resource_refs(page)
    assert len(refs) == len(PLOTS)
    assert all(r.startswith("data:image/png;base64,") for r in refs), refs
    assert "http://" not in page and "https://" not in page
    assert not _parse(page).tags & {"script", "link", "iframe", "object", "embed"}
    assert "@import" not in page and "url(" not in page


def test_html_embeds_every_plot_as_a_png_of_the_page_size(page):
    for ref in _resource_refs(page):
        png = base64.b64decode(ref.removeprefix("data:image/png;base64,"), validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", png[16:24]) == (1000, 600)


def test_html_escapes_what_users_and_trials_supply(page):
    assert EVIL_NAME not in page
    assert "script" not in _parse(page).tags and "img" in _parse(page).tags
    # The only images are the four plots: the trial's error message did not become a tag.
    assert len(_resource_refs(page)) == len(PLOTS)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt; &amp; more" in page
    assert f"<title>hptune report: {EVIL_NAME}" not in page


def test_html_lists_every_stopped_trial_with_its_reason(built):
    _, report, page = built
    assert {r["number"] for r in report["stopped_trials"]} == STOPPED
    table = page[page.index('<section id="stopped">'):]
    numbers = {int(n) for n in re.findall(r'<tr id="trial-(\d+)">', table)}
    assert numbers == STOPPED
    assert "pruned by successive_halving at rung 0 (epoch 3)" in table
    assert "early-stopped: no improvement for 3 epochs" in table
    assert "diverged at epoch 3" in table
    assert "cancelled with its job" in table


def test_html_shows_summary_best_trial_and_compute_saved(built):
    _, report, page = built
    best = report["best_trial"]
    assert f"Best trial #{best['number']}" in page
    assert f"{best['value']:.4g}" in page
    saved = report["compute_saved"]
    assert saved["pruned_epochs"] > 0 and saved["early_stopped_epochs"] > 0
    section = page[page.index('<section id="saved">'):page.index('<section id="plots">')]
    assert f">{saved['pruned_epochs']}<" in section
    assert f">{saved['early_stopped_epochs']}<" in section
    assert f"{saved['pruned_epochs_share']:.1%}" in section
    assert "succeeded" in page
    assert f">{report['total_epochs']}<" in page


def test_html_of_an_empty_study(storage):
    study = optuna.create_study(storage=storage, study_name="job-9", direction="maximize")
    page = render_html(build_report(study, _spec(), _job(status="queued")), study)
    assert "No trial has completed yet" in page
    assert len(_resource_refs(page)) == len(PLOTS)
    assert 'id="trial-' not in page


# --- CSV -----------------------------------------------------------------------------------------


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _num(cell: str) -> float | None:
    return float(cell) if cell != "" else None


def test_csv_has_one_row_per_trial_matching_the_trials(storage):
    study = _build(storage)
    text = render_csv(study)
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == [
        "number", "state", "stop_reason", "value", "stopped_epoch", "best_epoch",
        "learning_rate", "batch_size", "dropout", "weight_decay",
        "test_accuracy", "train_seconds", "datetime_start", "datetime_complete"]
    rows = list(reader)
    trials = study.get_trials()
    assert len(rows) == len(trials) == len(TRIALS)
    for row, t, (reason, _) in zip(rows, trials, TRIALS, strict=True):
        assert int(row["number"]) == t.number
        assert row["state"] == t.state.name
        assert row["stop_reason"] == reason
        # Values round-trip exactly; stopped trials have none.
        assert _num(row["value"]) == t.value
        assert int(row["stopped_epoch"]) == t.user_attrs["stopped_epoch"]
        assert int(row["best_epoch"]) == t.user_attrs["best_epoch"]
        for name, v in t.params.items():
            assert float(row[name]) == v
        assert _num(row["test_accuracy"]) == t.user_attrs.get("test_accuracy")
        assert float(row["train_seconds"]) == t.user_attrs["train_seconds"]
        assert datetime.fromisoformat(row["datetime_start"]) == t.datetime_start
        assert datetime.fromisoformat(row["datetime_complete"]) == t.datetime_complete
    by_reason = {r["stop_reason"]: r for r in rows}
    assert by_reason["pruned"]["state"] == "PRUNED" and by_reason["pruned"]["value"] == ""
    assert by_reason["diverged"]["state"] == "PRUNED"
    assert by_reason["failed"]["state"] == "FAIL"
    assert by_reason["early_stopped"]["state"] == "COMPLETE"


def test_csv_writes_fixed_parameters_with_their_fixed_value(storage):
    study = _build(storage, fixed={"weight_decay": 1e-4, "batch_size": 64})
    rows = _rows(render_csv(study))
    assert len(rows) == len(TRIALS)
    assert {float(r["weight_decay"]) for r in rows} == {1e-4}
    assert {int(float(r["batch_size"])) for r in rows} == {64}
    assert len({r["learning_rate"] for r in rows}) == len(TRIALS)


def test_csv_of_an_empty_study_is_a_header(storage):
    study = optuna.create_study(storage=storage, study_name="job-9")
    text = render_csv(study)
    assert _rows(text) == []
    assert text.splitlines()[0].startswith("number,state,stop_reason,value")
