"""Reports, pictures, events and metrics of a finished job, served by a real server."""

import csv
import html
import io
import json
import os
import re
import shutil
import struct
import subprocess
import time

import httpx
import optuna
import pytest
from optuna.trial import TrialState
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import create_key

JOB = {
    "name": "monitored",
    "dataset": "digits",
    "n_trials": 12,
    "max_epochs": 10,
    "search_space": {"batch_size": {"choices": [64, 128]}},
    "sampler": {"name": "random", "seed": 5},
    "pruner": {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
    "early_stopping": {"patience": 2},
    "model": {"hidden_layers": [32]},
}


@pytest.fixture(scope="module")
def finished(server):
    client = server.client("monitor")
    job = client.post("/api/v1/jobs", json=JOB).json()
    job = server.wait_job(client, job["id"])
    assert job["status"] == "succeeded"
    study = optuna.load_study(study_name=f"job-{job['id']}",
                              storage=server.env["HPTUNE_DATABASE_URL"])
    return client, job, study


def test_report_matches_the_study(finished):
    client, job, study = finished
    report = client.get(f"/api/v1/jobs/{job['id']}/report").json()
    trials = study.get_trials()
    by_state = {s: sum(t.state == s for t in trials) for s in TrialState}
    assert report["counts"]["complete"] == by_state[TrialState.COMPLETE]
    assert report["counts"]["pruned"] == by_state[TrialState.PRUNED]
    assert report["counts"]["failed"] == by_state[TrialState.FAIL]
    best = study.best_trial
    assert report["best_trial"]["number"] == best.number
    assert report["best_trial"]["value"] == study.best_value
    assert report["best_trial"]["params"] == best.params
    assert report["best_trial"]["best_epoch"] == best.user_attrs["best_epoch"]
    assert report["best_trial"]["test_metrics"]["accuracy"] == best.user_attrs["test_accuracy"]
    assert report["total_epochs"] == sum(len(t.intermediate_values) for t in trials)
    starts = [t.datetime_start for t in trials]
    ends = [t.datetime_complete for t in trials]
    assert report["wall_seconds"] == pytest.approx((max(ends) - min(starts)).total_seconds())

    stopped = {r["number"]: r for r in report["stopped_trials"]}
    expected = {"pruned_epochs": 0.0, "early_stopped_epochs": 0.0,
                "pruned_seconds": 0.0, "early_stopped_seconds": 0.0}
    for t in trials:
        reason = t.user_attrs["stop_reason"]
        if reason == "max_epochs":
            assert t.number not in stopped
            continue
        row = stopped[t.number]
        assert row["stop_reason"] == reason and row["reason"]
        if reason == "pruned":
            assert row["stopped_epoch"] == len(t.intermediate_values)
            _check_prune(row, t, trials)
        if reason == "early_stopped":
            assert row["stopped_epoch"] - row["best_epoch"] == JOB["early_stopping"]["patience"]
        cause = "early_stopped" if reason == "early_stopped" else "pruned"  # diverged: pruned
        not_trained = JOB["max_epochs"] - t.user_attrs["epochs_trained"]
        expected[f"{cause}_epochs"] += not_trained
        expected[f"{cause}_seconds"] += not_trained * t.user_attrs["epoch_seconds"]
    saved = report["compute_saved"]
    assert saved["pruned_epochs"] > 0
    assert saved["pruned_epochs"] == pytest.approx(expected["pruned_epochs"])
    assert saved["early_stopped_epochs"] == pytest.approx(expected["early_stopped_epochs"])
    # Seconds are rounded to the millisecond in the report.
    assert saved["pruned_seconds"] == pytest.approx(expected["pruned_seconds"], abs=1e-3)
    assert saved["early_stopped_seconds"] == pytest.approx(expected["early_stopped_seconds"],
                                                           abs=1e-3)
    assert saved["full_budget_epochs"] == JOB["n_trials"] * JOB["max_epochs"]
    assert saved["full_budget_seconds"] == pytest.approx(
        sum(t.user_attrs["epoch_seconds"] * JOB["max_epochs"] for t in trials), abs=1e-3)
    # What was trained and what was saved add up to running every trial to max_epochs.
    assert report["total_epochs"] + saved["pruned_epochs"] + saved["early_stopped_epochs"] == \
        pytest.approx(saved["full_budget_epochs"])
    # Shares are of the exact sums, rounded to 4 decimals (not ratios of the rounded figures:
    # with millisecond epochs those differ by more than the rounding).
    full_seconds = sum(t.user_attrs["epoch_seconds"] * JOB["max_epochs"] for t in trials)
    for kind in ("pruned", "early_stopped"):
        assert saved[f"{kind}_epochs_share"] == pytest.approx(
            expected[f"{kind}_epochs"] / saved["full_budget_epochs"], abs=5.1e-5)
        assert saved[f"{kind}_seconds_share"] == pytest.approx(
            expected[f"{kind}_seconds"] / full_seconds, abs=5.1e-5)


def _check_prune(row, trial, trials):
    """A pruned trial's fields against Optuna's own successive-halving records."""
    d = row["details"]
    assert d["pruner"] == JOB["pruner"]["name"]
    rung = max(int(k.rsplit("_", 1)[1]) for k in trial.system_attrs
               if k.startswith("completed_rung_"))
    key = f"completed_rung_{rung}"
    assert d["prune_rung"] == rung
    # Rung r ends at step min_resource x reduction_factor^r, where the trial was stopped.
    assert d["prune_step"] == JOB["pruner"]["reduction_factor"] ** rung == row["stopped_epoch"]
    assert d["prune_value"] == trial.system_attrs[key]
    # Compared with the trials that had reached the rung then (itself included): no more than
    # reached it by the end of the job.
    assert 1 <= d["prune_n_peers"] <= sum(key in t.system_attrs for t in trials)
    assert f"among {d['prune_n_peers']} trials" in row["reason"]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", ["learning_curves", "history", "importances", "lr_vs_batch"])
def test_plot_endpoints_return_pngs_of_the_asked_size(finished, name):
    client, job, _ = finished
    r = client.get(f"/api/v1/jobs/{job['id']}/plots/{name}", params={"width": 640, "height": 480})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert _png_size(r.content) == (640, 480)
    import matplotlib.image

    assert matplotlib.image.imread(io.BytesIO(r.content)).shape[:2] == (480, 640)


def test_unknown_plot_and_bad_size(finished):
    client, job, _ = finished
    assert client.get(f"/api/v1/jobs/{job['id']}/plots/pie").status_code == 404
    r = client.get(f"/api/v1/jobs/{job['id']}/plots/history", params={"width": 10})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "query.width"


def test_csv_and_html_formats(finished):
    client, job, study = finished
    r = client.get(f"/api/v1/jobs/{job['id']}/report", params={"format": "csv"})
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(row["number"]) for row in rows] == [t.number for t in study.get_trials()]
    r = client.get(f"/api/v1/jobs/{job['id']}/report", params={"format": "html"})
    assert r.headers["content-type"].startswith("text/html")
    assert "monitored" in r.text and "http://" not in r.text and "https://" not in r.text
    assert r.text.count("data:image/png;base64,") == 4


def test_event_stream_delivers_the_final_state(server):
    client = server.client("monitor")
    job = client.post("/api/v1/jobs", json={**JOB, "n_trials": 3, "max_epochs": 3}).json()
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job['id']}/events", timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    jobs = [e for k, e in events if k == "job"]
    trials = [e for k, e in events if k == "trial"]
    assert jobs[-1]["status"] == "succeeded" and jobs[-1]["finished"] == 3
    finished_numbers = {t["number"] for t in trials if t["state"] in ("COMPLETE", "PRUNED")}
    assert finished_numbers == {0, 1, 2}


def test_metrics_parse_with_the_prometheus_parser(finished, server):
    _, job, _ = finished
    report = server.client("monitor").get(f"/api/v1/jobs/{job['id']}/report").json()
    admin = create_key(server.env, "prometheus", admin=True)
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {admin}"}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {s.labels["status"]: s.value for s in families["hptune_jobs"].samples}
    assert jobs["succeeded"] >= 1
    trials = {s.labels["state"]: s.value for s in families["hptune_trials"].samples}
    assert trials["COMPLETE"] + trials["PRUNED"] >= JOB["n_trials"]
    hist = families["hptune_trial_duration_seconds"]
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    assert count >= JOB["n_trials"]
    # Recomputed from the recent jobs, so it may fall: a gauge, in the report's epochs.
    saved = families["hptune_epochs_saved"]
    assert saved.type == "gauge"
    by_cause = {s.labels["cause"]: s.value for s in saved.samples}
    assert by_cause["pruned"] >= report["compute_saved"]["pruned_epochs"] > 0
    assert by_cause["early_stopped"] >= report["compute_saved"]["early_stopped_epochs"]

    live = families["hptune_workers_live"].samples[0].value
    seen = {s.labels["worker"]: s.value
            for s in families["hptune_worker_last_seen_timestamp_seconds"].samples}
    assert len(seen) == live >= 2
    # The server's two embedded workers, each seen within the last minute.
    kids = subprocess.run(["pgrep", "-P", str(server.proc.pid), "-f", "service worker"],
                          capture_output=True, text=True).stdout.split()
    assert len(kids) == 2 and {f"worker-{pid}" for pid in kids} <= set(seen)
    now = time.time()
    assert all(now - 60 <= ts <= now + 1 for ts in seen.values()), (now, seen)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars"]


def _chromium(tmp_path, *args, timeout=90):
    profile = tmp_path / "profile"
    return subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("HPTUNE_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_and_dashboard_in_a_real_browser(finished, server, tmp_path):
    assert CHROMIUM, "HPTUNE_REQUIRE_BROWSER is set but chromium is missing"
    client, job, study = finished
    html = client.get(f"/api/v1/jobs/{job['id']}/report", params={"format": "html"}).text
    page = tmp_path / "report.html"
    page.write_text(html)
    shot = tmp_path / "report.png"
    # Opened from a file, with the network closed: the page must need nothing else.
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    assert shot.stat().st_size > 50_000
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert "monitored" in dom and "img" in dom

    admin = create_key(server.env, "ops", admin=True)
    admin_dir = tmp_path / "admin"
    dom = _dashboard_dom(admin_dir, server, admin)
    assert f"job-{job['id']}" in dom, dom[:2000]
    shot = tmp_path / "dashboard.png"
    _chromium(admin_dir, "--virtual-time-budget=15000", f"--screenshot={shot}",
              "--window-size=1400,900", _login_form(admin_dir, server, admin).as_uri())
    assert shot.stat().st_size > 20_000
    # A login can land on the job's own study page, which shows what the job is: its name and
    # spec, from the study's user attributes.
    study_id = study._study_id
    dom = _dashboard_dom(admin_dir, server, admin, f"/dashboard/studies/{study_id}")
    assert f"job-{job['id']} (id={study_id})" in dom and job["name"] in dom, dom[:2000]
    print(f"screenshots: {tmp_path / 'report.png'} {shot}")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("HPTUNE_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_an_owner_sees_their_own_studies_in_a_real_browser(finished, server, tmp_path):
    """A key without admin rights signs in too, and the dashboard lists its owner's studies
    and no one else's."""
    assert CHROMIUM, "HPTUNE_REQUIRE_BROWSER is set but chromium is missing"
    _client, job, study = finished
    stranger = server.client("stranger")
    other = stranger.post("/api/v1/jobs", json={**JOB, "n_trials": 1, "max_epochs": 1}).json()
    dom = _dashboard_dom(tmp_path / "owner", server, server.keys["monitor"])
    shown = {int(n) for n in re.findall(r"\bjob-(\d+)\b", dom)}
    assert job["id"] in shown and other["id"] not in shown, (shown, dom[:2000])
    dom = _dashboard_dom(tmp_path / "owner", server, server.keys["monitor"],
                         f"/dashboard/studies/{study._study_id}")
    assert f"job-{job['id']} (id={study._study_id})" in dom, dom[:2000]
    # The admin's dashboard lists both owners' studies.
    admin = create_key(server.env, "ops-2", admin=True)
    shown = {int(n) for n in re.findall(r"\bjob-(\d+)\b",
                                        _dashboard_dom(tmp_path / "admin", server, admin))}
    assert {job["id"], other["id"]} <= shown, shown
    server.wait_job(stranger, other["id"])


def _login_form(profile_dir, server, key, next_path=""):
    """A local page whose form POSTs the key (and `next`) to the server's login at once, as a
    person's browser does: the key goes in the body, never in a URL."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    page = profile_dir / "login.html"
    page.write_text(
        "<!doctype html><html><body>"
        f'<form method="post" action="{server.url}/dashboard/login">'
        f'<input name="key" value="{html.escape(key)}">'
        f'<input name="next" value="{html.escape(next_path)}"></form>'
        "<script>document.forms[0].submit()</script></body></html>")
    return page


def _dashboard_dom(profile_dir, server, key, next_path=""):
    """The DOM of the dashboard page a browser lands on after signing in with `key`, once its
    scripts have fetched the studies (each profile_dir is one browser profile)."""
    page = _login_form(profile_dir, server, key, next_path)
    return _chromium(profile_dir, "--virtual-time-budget=15000", "--dump-dom",
                     page.as_uri()).stdout


def test_dashboard_login_takes_every_key_by_post_only(server):
    user = server.client("plain-user")
    user_key = server.keys["plain-user"]
    assert httpx.get(f"{server.url}/api/studies").status_code == 401
    r = httpx.get(f"{server.url}/dashboard")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    # An owner's key opens the dashboard too, on its own studies only.
    job = user.post("/api/v1/jobs", json={**JOB, "n_trials": 1, "max_epochs": 1}).json()
    r = user.get("/api/studies")
    assert r.status_code == 200
    assert {s["study_name"] for s in r.json()["study_summaries"]} == {f"job-{job['id']}"}
    admin = create_key(server.env, "root", admin=True)
    r = httpx.get(f"{server.url}/api/studies", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200 and f"job-{job['id']}" in r.text
    # A key in a URL logs nobody in.
    r = httpx.get(f"{server.url}/dashboard/login", params={"key": admin})
    assert r.status_code == 400 and "set-cookie" not in r.headers
    # The login goes on to a dashboard page on this server, never elsewhere.
    for nxt, target in (("/dashboard/studies/1", "/dashboard/studies/1"),
                        ("//evil.example/x", "/dashboard"),
                        ("https://evil.example", "/dashboard"),
                        ("/dashboard/..//evil.example", "/dashboard"),
                        ("/api/v1/jobs", "/dashboard")):
        r = httpx.post(f"{server.url}/dashboard/login", data={"key": user_key, "next": nxt})
        assert r.status_code == 303 and r.headers["location"] == target, (nxt, r.headers)
        assert r.cookies.get("hptune_session")
    r = httpx.post(f"{server.url}/dashboard/login",
                   data={"key": "hpt_nope", "next": "/dashboard/x"})
    assert r.status_code == 401 and "location" not in r.headers
    assert "set-cookie" not in r.headers
    server.wait_job(user, job["id"])
