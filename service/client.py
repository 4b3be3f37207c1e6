"""The CLI's side of the REST API: an httpx client plus rich progress and report views."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
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

from service.status import TERMINAL


class ApiError(Exception):
    """A non-2xx answer, with the server's message."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a creating request is sent again when its answer is lost: `attempts` sends in all,
    waiting about base_s, 2 * base_s, 4 * base_s ... (at most cap_s, or the server's
    Retry-After up to cap_s) between them, with jitter so that clients do not retry in step."""

    attempts: int = 5
    base_s: float = 0.5
    cap_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if not 0 <= self.base_s <= self.cap_s:
            raise ValueError(f"need 0 <= base_s <= cap_s, got {self.base_s}, {self.cap_s}")

    def delay_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (0 for the first)."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.cap_s)
        delay = min(self.base_s * 2**attempt, self.cap_s)
        return delay / 2 + random.uniform(0, delay / 2)


# Submissions and uploads carry an Idempotency-Key, so sending one again never makes a second
# job or dataset: they are retried after a timeout, a lost connection, a 5xx, or a 409 that
# asks to come back (Retry-After: the first attempt is still in progress).
CREATE_RETRY = RetryPolicy()


def _retry_after_s(r: httpx.Response) -> float | None:
    try:
        return float(r.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _worth_retrying(r: httpx.Response) -> bool:
    return r.status_code >= 500 or (r.status_code == 409 and "retry-after" in r.headers)


class Client:
    """A thin typed wrapper over the REST API."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._checked(self.http.request(method, path, **kwargs))

    def _send_idempotent(self, path: str, policy: RetryPolicy, key: str | None,
                         on_retry: Callable[[str], None] | None, **kwargs: Any
                         ) -> httpx.Response:
        """POST with an Idempotency-Key (a fresh uuid4 unless given), sent again under
        `policy` with the same key while no answer arrives or the answer says to retry."""
        headers = {"Idempotency-Key": key or str(uuid.uuid4())}
        for attempt in range(policy.attempts):
            last = attempt == policy.attempts - 1
            try:
                r = self.http.post(path, headers=headers, **kwargs)
            except httpx.TransportError as exc:  # timeouts, refused or dropped connections
                if last:
                    raise
                why, wait = f"no answer ({type(exc).__name__})", policy.delay_s(attempt)
            else:
                if last or not _worth_retrying(r):
                    return self._checked(r)
                why, wait = f"HTTP {r.status_code}", policy.delay_s(attempt, _retry_after_s(r))
            if on_retry is not None:
                on_retry(f"{why}; sending it again with the same Idempotency-Key in "
                         f"{wait:.1f} s (attempt {attempt + 2} of {policy.attempts})")
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _checked(self, r: httpx.Response) -> httpx.Response:
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

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None,
               on_retry: Callable[[str], None] | None = None,
               policy: RetryPolicy = CREATE_RETRY) -> dict[str, Any]:
        """Submit a job; retried with one Idempotency-Key, so it makes one job at most."""
        return self._send_idempotent("/api/v1/jobs", policy, idempotency_key, on_retry,
                                     json=spec).json()

    def upload_dataset(self, path: Path, target: str | None = None, name: str | None = None,
                       idempotency_key: str | None = None,
                       on_retry: Callable[[str], None] | None = None,
                       policy: RetryPolicy = CREATE_RETRY) -> dict[str, Any]:
        """Upload a CSV or NPZ dataset; retried like submit, so it stores one dataset."""
        form = {k: v for k, v in (("target", target), ("name", name)) if v is not None}
        return self._send_idempotent("/api/v1/datasets", policy, idempotency_key, on_retry,
                                     files={"file": (path.name, path.read_bytes())},
                                     data=form).json()

    def job(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/jobs/{job_id}")

    def pages(self, path: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Every page of a list, following each page's `next` link until it is null."""
        page = self._call("GET", path, params={"limit": limit} if limit else None)
        while True:
            yield page
            if not page.get("next"):
                return
            page = self._call("GET", page["next"])

    def all_of(self, path: str, limit: int | None = None) -> dict[str, Any]:
        """A whole list read page by page: {"data": every item, "count": the total}."""
        data: list[Any] = []
        count = 0
        for page in self.pages(path, limit):
            data += page["data"]
            count = page["count"]
        return {"data": data, "count": count}

    def jobs(self) -> dict[str, Any]:
        """Every job the key sees, newest first (all pages)."""
        return self.all_of("/api/v1/jobs", limit=500)

    def trials(self, job_id: int) -> dict[str, Any]:
        """Every trial of the job in number order (all pages)."""
        return self.all_of(f"/api/v1/jobs/{job_id}/trials", limit=1000)

    def datasets(self) -> dict[str, Any]:
        """Every dataset the key sees (all pages)."""
        return self.all_of("/api/v1/datasets", limit=500)

    def report(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/jobs/{job_id}/report")

    def report_as(self, job_id: int, fmt: str) -> bytes:
        """The report exactly as the API renders it in `fmt`: json, html or csv."""
        return self._send("GET", f"/api/v1/jobs/{job_id}/report",
                          params={"format": fmt}).content

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self._call("POST", f"/api/v1/jobs/{job_id}/cancel")

    def model(self, job_id: int, trial: int | None = None) -> tuple[int, bytes]:
        """(trial number, ONNX bytes) of the job's best stored model, or of `trial`'s."""
        params = {} if trial is None else {"trial": trial}
        r = self._send("GET", f"/api/v1/jobs/{job_id}/model", params=params)
        return int(r.headers["x-hptune-trial"]), r.content

    def predict(self, job_id: int, csv: bytes, trial: int | None = None) -> dict[str, Any]:
        """Predictions of the job's model for the raw rows of a CSV body."""
        params = {} if trial is None else {"trial": trial}
        return self._send("POST", f"/api/v1/jobs/{job_id}/predict", params=params,
                          content=csv, headers={"Content-Type": "text/csv"}).json()

    def extend(self, job_id: int, n_trials: int) -> dict[str, Any]:
        """Raise the job's n_trials; a succeeded job runs again, keeping its study."""
        return self._call("PATCH", f"/api/v1/jobs/{job_id}", json={"n_trials": n_trials})

    def resume(self, job_id: int) -> dict[str, Any]:
        """Resume a cancelled job where it stopped."""
        return self._call("POST", f"/api/v1/jobs/{job_id}/resume")


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


# Stopped trials the terminal report lists at most (the HTML page lists more, the CSV all).
TERMINAL_STOPPED_ROWS = 50


def closest_stopped(report: dict[str, Any], n: int = TERMINAL_STOPPED_ROWS
                    ) -> list[dict[str, Any]]:
    """The report's stopped trials, or when there are more than `n` the `n` that reached the
    best values (a trial's value, else the best before it stopped), best first."""
    stopped = report["stopped_trials"]
    if len(stopped) <= n:
        return stopped
    sign = -1.0 if report.get("direction", "maximize") == "maximize" else 1.0

    def key(r: dict[str, Any]) -> tuple[bool, float, int]:
        v = r["value"] if r["value"] is not None else r["details"].get("best_value")
        return (v is None, 0.0 if v is None else sign * v, r["number"])

    return sorted(stopped, key=key)[:n]


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
    caption = "epoch: stopped at / best"
    if len(stopped) > TERMINAL_STOPPED_ROWS:
        caption += (f"; the {TERMINAL_STOPPED_ROWS} that reached the best values, best first: "
                    f"`hptune report {report['job']['id']} --format csv` lists every one")
    t = Table(title=f"{len(stopped)} trials stopped before max_epochs "
                    f"({report['spec']['max_epochs']})", caption=caption)
    stopped = closest_stopped(report)
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
