"""The CLI's side of the REST API: an httpx client plus rich progress and report views."""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """A non-2xx answer, with the server's message."""


class Client:
    """A thin typed wrapper over the REST API."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        r = self.http.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                body = r.json()
                msg = body.get("detail", r.text)
                fields = [f"{e['field']}: {e['message']}" for e in body.get("errors", [])
                          if e.get("field")]
                if fields:
                    msg = f"{msg} ({'; '.join(fields)})"
            except ValueError:
                msg = r.text
            raise ApiError(f"HTTP {r.status_code}: {msg}")
        return r

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self._send(method, path, **kwargs)
        return r.json() if r.content else None

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/v1/jobs", json=spec)

    def job(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/jobs/{job_id}")

    def jobs(self) -> dict[str, Any]:
        return self._call("GET", "/api/v1/jobs")

    def report(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/jobs/{job_id}/report")

    def report_as(self, job_id: int, fmt: str) -> bytes:
        """The report exactly as the API renders it in `fmt`: json, html or csv."""
        return self._send("GET", f"/api/v1/jobs/{job_id}/report",
                          params={"format": fmt}).content

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/jobs/{job_id}/cancel")


def watch(client: Client, job_id: int, console: Console, poll_s: float = 1.0) -> dict[str, Any]:
    """Show a live progress bar until the job ends; returns the final job."""
    job = client.job(job_id)
    columns = (
        TextColumn("[bold]job {task.fields[job_id]}[/] {task.fields[status]}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TextColumn("pruned {task.fields[pruned]} failed {task.fields[failed]} "
                   "best {task.fields[best]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(compact=True),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("trials", total=job["n_trials"], job_id=job_id,
                                 status=job["status"], pruned=0, failed=0, running=0, best="-")
        while True:
            c = job["counts"]
            best = job.get("best_value")
            progress.update(
                task, completed=job["finished"], status=job["status"], pruned=c["pruned"],
                failed=c["failed"], running=c["running"],
                best=f"{best:.4f}" if best is not None else "-",
            )
            if job["status"] in TERMINAL:
                break
            time.sleep(poll_s)
            job = client.job(job_id)
    return job


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2g}" if abs(v) < 0.01 else f"{v:.3g}"
    return "-" if v is None else str(v)


def short_reason(row: dict[str, Any], resource: str = "epochs") -> str:
    """A stopped trial's reason in a few words, for narrow terminals; `resource` is what the
    pruner's steps count (epochs or examples)."""
    d, reason = row["details"], row["stop_reason"]
    if reason == "pruned":
        step = d.get("prune_step")
        rung = (f" rung {d['prune_rung']}" if "prune_rung" in d
                else f" at {step} examples" if resource == "examples" else f" epoch {step}")
        value, cut = d.get("prune_value"), d.get("prune_cutoff")
        if isinstance(value, int | float) and isinstance(cut, int | float):
            return (f"{d.get('pruner')}{rung}: {value:.4f} < cut-off {cut:.4f} "
                    f"({d.get('prune_n_peers')} peers)")
        return f"{d.get('pruner')}{rung}"
    if reason == "early_stopped":
        return f"no gain in {d.get('patience')} epochs after epoch {row['best_epoch']}"
    if reason == "diverged":
        return f"diverged: loss {d.get('diverged_loss')}"
    return row.get("reason") or str(reason)


def print_report(report: dict[str, Any], console: Console) -> None:
    """The early-stopped trial report as rich tables."""
    job, c = report["job"], report["counts"]
    console.rule(f"[bold]report: job {job['id']} ({job['name']})")
    console.print(
        f"status [bold]{job['status']}[/]  finished {c['complete'] + c['pruned']}/"
        f"{job['n_trials']}  complete {c['complete']}  pruned {c['pruned']}  "
        f"failed {c['failed']}  epochs trained {report['total_epochs']}  "
        f"wall {_fmt(report['wall_seconds'])} s"
    )
    best = report["best_trial"]
    if best:
        t = Table(title=f"best trial #{best['number']}", show_header=True)
        t.add_column("hyperparameter")
        t.add_column("value", justify="right")
        for k, v in best["params"].items():
            t.add_row(k, _fmt(v))
        t.add_row(f"[bold]{best['metric']}", f"[bold]{_fmt(best['value'])}")
        for k, v in best["test_metrics"].items():
            t.add_row(f"test {k}", _fmt(v))
        t.add_row("best epoch / stopped", f"{best['best_epoch']} / {best['stopped_epoch']}")
        console.print(t)
    stopped = report["stopped_trials"]
    resource = report["spec"]["pruner"]["resource"]
    t = Table(title=f"{len(stopped)} trials stopped before max_epochs "
                    f"({report['spec']['max_epochs']})", caption="epoch: stopped at / best")
    for col in ("#", "state", "epoch", "lr", "batch", "drop", "wd"):
        t.add_column(col, no_wrap=True)
    t.add_column("why", overflow="fold")
    for r in stopped:
        p = r["params"]
        t.add_row(str(r["number"]), r["state"].lower(),
                  f"{_fmt(r['stopped_epoch'])}/{_fmt(r['best_epoch'])}",
                  _fmt(p.get("learning_rate")), _fmt(p.get("batch_size")),
                  _fmt(p.get("dropout")), _fmt(p.get("weight_decay")),
                  short_reason(r, resource))
    console.print(t)
    a = report.get("pruning_audit")
    if a:
        console.print(
            f"pruning audit: {a['false_prunes']} of {a['n_audited']} audited trials would have "
            f"beaten the best kept trial; regret {_fmt(a['regret'])}")
    s = report["compute_saved"]
    console.print(
        f"compute saved: pruning {s['pruned_epochs']} epochs "
        f"({s['pruned_epochs_share']:.0%}), early stopping {s['early_stopped_epochs']} epochs "
        f"({s['early_stopped_epochs_share']:.0%}) of {s['full_budget_epochs']} epochs "
        f"that running every trial to max_epochs would cost"
    )
