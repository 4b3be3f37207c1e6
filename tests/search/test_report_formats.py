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
    """A study holding every kind of outcome, as search.runner.run_trial records them."""
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


# --- retries and compute saved -------------------------------------------------------------------


def _add(study, i, state, attrs, iv=None, value=None, system_attrs=None):
    params = _params(i)
    study.add_trial(optuna.create_trial(
        state=state, value=value, params=params, distributions={k: DISTS[k] for k in params},
        user_attrs={"epoch_seconds": 0.5, **attrs}, intermediate_values=iv or {},
        system_attrs=system_attrs or {}))


def _retry_of(*chain):
    """Optuna's system attributes on a retry (RetryHeartbeatStaleTrialCallback)."""
    return {"failed_trial": chain[0], "retry_history": list(chain)}


def test_failed_trials_name_their_retry_and_only_then_say_retried(storage):
    study = optuna.create_study(storage=storage, study_name="job-4", direction="maximize")
    lost = {"stop_reason": "failed", "stopped_epoch": 1}
    _add(study, 0, TrialState.FAIL, lost)                                  # lost, retried as 1
    _add(study, 1, TrialState.FAIL, lost, system_attrs=_retry_of(0))       # lost, retried as 2
    _add(study, 2, TrialState.FAIL, lost, system_attrs=_retry_of(0, 1))    # retry limit reached
    _add(study, 3, TrialState.FAIL, {**lost, "error": "RuntimeError: boom"})  # no free slot
    _add(study, 4, TrialState.FAIL, {"stop_reason": "cancelled", "stop_cause": "handed_back",
                                     "stopped_epoch": 2})                  # handed back, as 5
    _add(study, 5, TrialState.COMPLETE, {"stop_reason": "max_epochs", "stopped_epoch": 10},
         value=0.9, system_attrs=_retry_of(4))
    report = build_report(study, _spec(), _job())
    rows = {r["number"]: r for r in report["stopped_trials"]}
    assert set(rows) == {0, 1, 2, 3, 4}
    assert {n: r["details"].get("retried_as") for n, r in rows.items()} == \
        {0: 1, 1: 2, 2: None, 3: None, 4: 5}
    assert rows[2]["details"]["retry_of"] == 0 and rows[2]["details"]["retry_history"] == [0, 1]
    assert rows[0]["reason"] == "failed (worker lost); retried as trial #1"
    assert rows[1]["reason"] == "failed (worker lost); a retry of trial #0; retried as trial #2"
    assert rows[2]["reason"] == "failed (worker lost); a retry of trial #1"
    assert rows[3]["reason"] == "failed: RuntimeError: boom"
    assert rows[4]["reason"] == "handed back by a worker that was stopped; retried as trial #5"
    for n in (2, 3):
        assert "retried" not in rows[n]["reason"]
    page = render_html(report, study)
    assert "retried as trial #1" in page and "a retry of trial #1</td>" in page


EXAMPLES = 1000  # training rows of the synthetic dataset below


def test_compute_saved_counts_only_trials_that_really_stopped_early(storage):
    """Audited trials trained on after the pruner's verdict: that saved nothing, unless their
    continued run stopped early itself. Steps count examples, epochs are fractional."""
    spec = _spec(audit_fraction=0.5, pruner={"name": "successive_halving",
                                             "resource": "examples", "min_resource": 300})
    study = optuna.create_study(storage=storage, study_name="job-5", direction="maximize")
    study.set_user_attr("spec", spec.model_dump(mode="json"))

    def pruned(step, **audit):
        return {"stop_reason": "pruned", "stopped_epoch": -(-step // EXAMPLES),
                "epochs_trained": step / EXAMPLES, "examples_seen": step,
                "pruner": "successive_halving", "prune_step": step, "prune_rung": 0,
                "prune_value": 0.5, "prune_cutoff": 0.6, "prune_n_peers": 3, **audit}

    full = {"stop_reason": "max_epochs", "stopped_epoch": 10, "epochs_trained": 10.0,
            "examples_seen": 10 * EXAMPLES}
    _add(study, 0, TrialState.COMPLETE, full, value=0.8)
    _add(study, 1, TrialState.PRUNED, pruned(600))                          # saves 9.4 epochs
    _add(study, 2, TrialState.PRUNED, pruned(1200, audited=True, audit_trained_epochs=10,
                                             audit_stop_reason="max_epochs"))  # saves nothing
    _add(study, 3, TrialState.PRUNED, pruned(2000, audited=True, audit_trained_epochs=7,
                                             audit_stop_reason="early_stopped"))  # saves 3
    _add(study, 4, TrialState.COMPLETE, {"stop_reason": "early_stopped", "stopped_epoch": 6,
                                         "epochs_trained": 6.0, "patience": 2}, value=0.7)
    report = build_report(study, spec, _job())
    saved = report["compute_saved"]
    assert saved["pruned_epochs"] == pytest.approx(9.4)
    assert saved["early_stopped_epochs"] == 3 + 4
    assert saved["pruned_seconds"] == pytest.approx(9.4 * 0.5)
    assert saved["early_stopped_seconds"] == pytest.approx(7 * 0.5)
    # Epochs trained, audit included, and epochs saved add up to the full budget.
    assert report["total_epochs"] == pytest.approx(10 + 0.6 + 10 + 7 + 6)
    assert report["total_epochs"] + saved["pruned_epochs"] + saved["early_stopped_epochs"] == \
        pytest.approx(saved["full_budget_epochs"]) == 5 * MAX_EPOCHS
    assert saved["pruned_epochs_share"] == pytest.approx(9.4 / 50, abs=1e-4)

    rows = {r["number"]: r for r in report["stopped_trials"]}
    assert rows[1]["reason"].startswith("pruned by successive_halving at rung 0 (600 examples)")
    assert rows[2]["reason"].endswith("; audited: trained on to epoch 10")
    page = render_html(report, study)
    audit = page[page.index('<section id="audit">'):page.index('<section id="plots">')]
    assert "<td>1200 examples (epoch 1.20)</td>" in audit
    assert "epoch 1200" not in page and "epoch 2000" not in page
