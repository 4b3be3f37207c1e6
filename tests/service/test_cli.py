"""The CLI as a user runs it, against a real server."""

import csv
import json
import time

from tests.conftest import create_key, hptune

JOB = {"name": "cli-job", "n_trials": 4, "max_epochs": 4, "model": {"hidden_layers": [16]},
       "search_space": {"batch_size": {"choices": [128, 256]}},
       "pruner": {"name": "successive_halving", "reduction_factor": 2}}


def test_submit_watch_report_and_jobs(server, tmp_path):
    client = server.client("cli-user")
    env = {**server.env, "HPTUNE_URL": server.url, "HPTUNE_API_KEY": server.keys["cli-user"],
           "COLUMNS": "160"}
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(JOB))
    out = hptune("submit", str(spec), "--watch", env=env, timeout=300).stdout
    assert "submitted job" in out and "report: job" in out and "succeeded" in out
    assert "best trial" in out and "compute saved" in out
    job_id = int(out.split("submitted job ")[1].split()[0])
    assert client.get(f"/api/v1/jobs/{job_id}").json()["finished"] == 4

    listing = hptune("jobs", env=env).stdout
    assert "cli-job" in listing and "4/4" in listing
    report = json.loads(hptune("report", str(job_id), "--format", "json", env=env).stdout)
    assert report["job"]["id"] == job_id and report["counts"]["complete"] + \
        report["counts"]["pruned"] == 4
    watched = hptune("watch", str(job_id), env=env).stdout
    assert f"job {job_id} succeeded" in watched


def test_report_saves_the_html_page_and_the_csv(server, tmp_path):
    client = server.client("cli-user")
    env = {**server.env, "HPTUNE_URL": server.url, "HPTUNE_API_KEY": server.keys["cli-user"]}
    job_id = client.post("/api/v1/jobs", json={**JOB, "name": "cli-formats"}).json()["id"]
    server.wait_job(client, job_id)

    page = tmp_path / "report.html"
    r = hptune("report", str(job_id), "--format", "html", "--output", str(page), env=env)
    assert f"to {page}" in r.stderr and r.stdout == ""
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "cli-formats" in html
    assert html.count("data:image/png;base64,") == 4
    # The bytes the API serves, CRLF line ends of the CSV included; the suffix tells the format.
    sheet = tmp_path / "trials.csv"
    hptune("report", str(job_id), "-o", str(sheet), env=env)
    api = client.get(f"/api/v1/jobs/{job_id}/report", params={"format": "csv"})
    assert sheet.read_bytes() == api.content
    rows = list(csv.DictReader(sheet.open(newline="")))
    assert [int(row["number"]) for row in rows] == [0, 1, 2, 3]
    assert hptune("report", str(job_id), "--format", "csv", env=env).stdout.replace(
        "\r\n", "\n") == api.text.replace("\r\n", "\n")

    r = hptune("report", str(job_id), "-o", str(tmp_path / "report.pdf"), env=env, check=False)
    assert r.returncode == 2 and "--format" in r.stderr
    r = hptune("report", str(job_id), "--format", "pdf", env=env, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = hptune("report", str(job_id), "-o", str(tmp_path / "no" / "such.csv"), env=env,
               check=False)
    assert r.returncode == 1 and "cannot write" in r.stderr and "Traceback" not in r.stderr


def test_trials_prints_the_table_and_saves_every_trial(server, tmp_path):
    client = server.client("cli-user")
    env = {**server.env, "HPTUNE_URL": server.url, "HPTUNE_API_KEY": server.keys["cli-user"],
           "COLUMNS": "200"}
    job_id = client.post("/api/v1/jobs", json={**JOB, "name": "cli-trials"}).json()["id"]
    server.wait_job(client, job_id)
    count = client.get(f"/api/v1/jobs/{job_id}/trials", params={"limit": 1}).json()["count"]

    saved = tmp_path / "trials.json"
    r = hptune("trials", str(job_id), "-o", str(saved), env=env)
    assert f"{count} trials of job {job_id}" in r.stderr and r.stdout == ""
    body = json.loads(saved.read_text())
    assert body["count"] == count == len(body["trials"]) >= JOB["n_trials"]
    assert sorted(t["number"] for t in body["trials"]) == list(range(count))
    assert {"state", "value", "params", "stop_reason"} <= body["trials"][0].keys()

    table = hptune("trials", str(job_id), env=env).stdout
    assert f"job {job_id}: {count} trials" in table and "batch_size" in table
    assert all(f" {t['state'].lower()} " in table for t in body["trials"])
    assert "left out" not in table  # a small job prints every trial
    from service.cli_trials import trial_tail
    from service.client import Client

    rows, total = trial_tail(Client(server.url, server.keys["cli-user"]), job_id, 2)
    assert total == count and [t["number"] for t in rows] == [count - 2, count - 1]

    r = hptune("trials", str(job_id), "-o", str(tmp_path / "trials.csv"), env=env, check=False)
    assert r.returncode == 2 and ".json" in r.stderr and "Traceback" not in r.stderr
    r = hptune("trials", "999999", env=env, check=False)
    assert r.returncode == 1 and "HTTP 404" in r.stderr and "Traceback" not in r.stderr
    other = {**env, "HPTUNE_API_KEY": create_key(server.env, "cli-other")}
    r = hptune("trials", str(job_id), "-o", str(tmp_path / "theirs.json"), env=other,
               check=False)
    assert r.returncode == 1 and "HTTP 404" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "theirs.json").exists()


def test_trials_table_shows_the_last_rows_of_a_long_job():
    """A job with more trials than the table holds: the last 50 and how to get every one."""
    from rich.console import Console

    from service.cli_trials import TERMINAL_TRIAL_ROWS, print_trials

    rows = [{"number": n, "state": "PRUNED", "value": None, "stop_reason": "pruned",
             "stopped_epoch": 2, "best_epoch": 1, "params": {"dropout": 0.1}}
            for n in range(950, 1000)]
    console = Console(record=True, width=200)
    print_trials(7, rows, 1000, console)
    text = console.export_text()
    assert len(rows) == TERMINAL_TRIAL_ROWS and "job 7: 1000 trials" in text
    assert "950 earlier ones left out" in text and "hptune trials 7 -o trials.json" in text
    assert " 999 " in text and " 949 " not in text


def test_cli_errors_are_messages_not_tracebacks(server, tmp_path):
    env = {**server.env, "HPTUNE_URL": server.url, "HPTUNE_API_KEY": "hpt_wrong"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_trials": -1}))
    r = hptune("submit", str(bad), env=env, check=False)
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "Traceback" not in r.stderr
    server.client("cli-user")
    env["HPTUNE_API_KEY"] = server.keys["cli-user"]
    r = hptune("submit", str(bad), env=env, check=False)
    assert r.returncode == 1 and "n_trials" in r.stderr and "Traceback" not in r.stderr
    bad.write_text("{not json")
    r = hptune("submit", str(bad), env=env, check=False)
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    r = hptune("jobs", env={**env, "HPTUNE_URL": "http://127.0.0.1:9"}, check=False)
    assert r.returncode == 1 and "cannot reach the API" in r.stderr
    r = hptune("serve", env={**env, "HPTUNE_GRACE_PERIOD": "1"}, check=False)
    assert r.returncode == 2 and "HPTUNE_GRACE_PERIOD" in r.stderr


def test_embedded_workers_never_outlive_serve(tmp_path):
    import os
    import signal
    import subprocess

    from tests.conftest import start_server

    srv = start_server(tmp_path, workers=2)
    deadline = time.monotonic() + 30
    kids: list[str] = []
    while len(kids) < 2 and time.monotonic() < deadline:
        kids = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True,
                              text=True).stdout.split()
        time.sleep(0.2)
    assert len(kids) == 2
    os.kill(srv.proc.pid, signal.SIGKILL)  # no chance to stop its workers itself
    srv.proc.wait()

    def alive(pid: str) -> bool:
        try:
            with open(f"/proc/{pid}/status") as fh:
                return "zombie" not in fh.read()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 40
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(k) for k in kids)


def test_worker_check_tells_a_live_worker_from_none(server, tmp_path):
    """The compose health check: `hptune worker --check` passes while a worker on this host
    reports, and fails in one line where none does or the database has no registry."""
    deadline = time.monotonic() + 60  # the server's workers may still be starting
    while (r := hptune("worker", "--check", env=server.env, check=False)).returncode:
        assert time.monotonic() < deadline, r.stderr
        time.sleep(1)
    assert "worker-" in r.stdout
    empty = {**server.env, "HPTUNE_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    r = hptune("worker", "--check", env=empty, check=False)
    assert r.returncode == 1 and "cannot read the worker registry" in r.stderr
    hptune("db", "upgrade", env=empty)
    r = hptune("worker", "--check", env=empty, check=False)
    assert r.returncode == 1 and "no worker on" in r.stderr and "Traceback" not in r.stderr


def test_the_terminal_report_lists_the_closest_stopped_trials_of_a_big_job():
    """A job with thousands of stopped trials prints the 50 that came closest (the CSV and
    JSON formats hold every one); a small job prints all of them, in number order."""
    from rich.console import Console

    from service.client import TERMINAL_STOPPED_ROWS, closest_stopped, print_report

    def row(n, value=None, best=None):
        return {"number": n, "state": "PRUNED", "params": {}, "stop_reason": "pruned",
                "stopped_epoch": 1, "best_epoch": 1, "value": value, "reason": "pruned",
                "details": {"best_value": best}}

    stopped = [row(n, best=(n * 37 % 997) / 1000) for n in range(3000)] + [row(3000)]
    report = {"job": {"id": 9, "name": "big", "status": "succeeded", "n_trials": 3001},
              "counts": {"complete": 0, "pruned": 3001, "failed": 0}, "total_epochs": 3001,
              "wall_seconds": 1.0, "best_trial": None, "direction": "minimize",
              "spec": {"max_epochs": 5, "pruner": {"resource": "epochs"}},
              "stopped_trials": stopped, "pruning_audit": None,
              "compute_saved": {"pruned_epochs": 1, "pruned_epochs_share": 0.1,
                                "early_stopped_epochs": 0, "early_stopped_epochs_share": 0.0,
                                "full_budget_epochs": 10}}
    shown = closest_stopped(report)
    assert len(shown) == TERMINAL_STOPPED_ROWS
    values = [r["details"]["best_value"] for r in shown]
    assert values == sorted(values) and values[0] == 0.0  # minimised: lowest first
    console = Console(record=True, width=240)
    print_report(report, console)
    text = console.export_text()
    assert "3001 trials stopped before max_epochs" in text
    assert "--format csv` lists every one" in text
    assert closest_stopped({**report, "stopped_trials": stopped[:10]}) == stopped[:10]
