"""The `hptune` command line: run the service, manage keys, submit and follow jobs."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from service.cli_demo import demo_app
from service.cli_lifecycle import lifecycle_app
from service.cli_models import models_app, write_output
from service.cli_trials import trials_app
from service.spawn import spawn_workers, stop_workers

if TYPE_CHECKING:
    from service.client import Client

# service.client (httpx, rich's progress) is imported by the commands that call the API:
# `python -m service serve` and `worker`, which the service spawns, do not need it.

app = typer.Typer(help="hptune: hyperparameter tuning jobs over REST.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(lifecycle_app)  # `extend` and `resume` (service/cli_lifecycle.py)
app.add_typer(models_app)  # `model` and `predict` (service/cli_models.py)
app.add_typer(trials_app)  # `trials` (service/cli_trials.py)
app.add_typer(demo_app)  # `demo` (service/cli_demo.py)

console = Console()
# Messages are not wrapped: they may be read by scripts as much as by people.
err = Console(stderr=True, soft_wrap=True)

UrlOpt = Annotated[str, typer.Option(envvar="HPTUNE_URL", help="API base URL.")]
KeyOpt = Annotated[str | None, typer.Option(envvar="HPTUNE_API_KEY", help="API key.")]


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("HPTUNE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings():
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        for e in exc.errors():
            err.print(f"[red]bad setting HPTUNE_{'_'.join(map(str, e['loc'])).upper()}: "
                      f"{e['msg']}")
        raise typer.Exit(2) from None


def _client(url: str, key: str | None) -> Client:
    from service.client import Client

    if not key:
        err.print("[red]no API key: pass --key or set HPTUNE_API_KEY "
                  "(create one with `hptune keys create --owner NAME`)")
        raise typer.Exit(2)
    return Client(url, key)


def _api_call(fn, *args):
    from service.client import ApiError

    try:
        return fn(*args)
    except ApiError as exc:
        err.print(f"[red]{exc}")
        raise typer.Exit(1) from None
    except Exception as exc:  # connection refused and friends: say so without a traceback
        err.print(f"[red]cannot reach the API: {exc}")
        raise typer.Exit(1) from None


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes to run beside the API.")
                       ] = 2,
) -> None:
    """Run the API with N embedded worker processes."""
    import uvicorn

    from service.api import create_app
    from service.migrate import upgrade
    from service.scheduler import open_database

    _setup_logging()
    settings = _settings()
    db = open_database(settings)
    upgrade(db)
    procs = spawn_workers(workers)
    try:
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down, so the workers are stopped
        # in the app's shutdown, not after run() returns.
        uvicorn.run(create_app(settings, db, on_shutdown=lambda: stop_workers(procs)),
                    host=host, port=port, log_level="warning")
    finally:
        stop_workers(procs)


@app.command()
def worker(
    check: Annotated[bool, typer.Option(
        "--check", help="Run no worker: exit 0 if a worker on this host reported within the "
        "last minute, 1 if none did (a container health check).")] = False,
) -> None:
    """Run one standalone worker (start as many as you have cores, on any machine)."""
    if check:
        from service.registry import WORKER_LIVE_WINDOW_S, live_workers
        from service.scheduler import open_database

        host = socket.gethostname()
        try:
            mine = [w for w in live_workers(open_database(_settings())) if w.hostname == host]
        except Exception as exc:  # no database, no schema: unhealthy, said in one line
            err.print(f"cannot read the worker registry: {type(exc).__name__}")
            raise typer.Exit(1) from None
        if not mine:
            err.print(f"no worker on {host} reported in the last {WORKER_LIVE_WINDOW_S} s")
            raise typer.Exit(1)
        console.print(", ".join(f"{w.name} {w.state}" for w in mine))
        return
    from service.worker import run_worker

    _setup_logging()
    run_worker(_settings())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the service's tables and Optuna's."""
    from service.migrate import upgrade
    from service.scheduler import open_database

    db = open_database(_settings())
    upgrade(db)
    console.print("database is up to date")


@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="Who the key belongs to.")],
    admin: Annotated[bool, typer.Option("--admin", help="Sees every owner's jobs.")] = False,
) -> None:
    """Create an API key; the key is printed once, alone on the last line."""
    from service.keys import create_key
    from service.migrate import upgrade
    from service.scheduler import open_database

    db = open_database(_settings())
    upgrade(db)
    with db.session() as s:
        row, secret = create_key(s, owner, admin)
        key_id = row.id
    err.print(f"created key {key_id} for {owner}{' (admin)' if admin else ''}; "
              "store it now, it is not shown again:")
    print(secret)


@keys_app.command("list")
def keys_list() -> None:
    """List keys without their secrets."""
    from service.keys import list_keys
    from service.scheduler import open_database

    db = open_database(_settings())
    with db.session() as s:
        # Plain tab-separated lines: easy to read and to grep.
        print("id\towner\tfingerprint\trole\tstate\tcreated")
        for k in list_keys(s):
            state = "revoked" if k.revoked_at else "active"
            print(f"{k.id}\t{k.owner}\t{k.prefix}\t{'admin' if k.is_admin else 'user'}"
                  f"\t{state}\t{k.created_at:%Y-%m-%d %H:%M}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="Key id from `keys list`.")]) -> None:
    """Revoke a key; requests with it get 401 from then on."""
    from service.errors import NotFound
    from service.keys import revoke_key
    from service.scheduler import open_database

    db = open_database(_settings())
    try:
        with db.session() as s:
            revoke_key(s, key_id)
    except NotFound as exc:
        err.print(f"[red]{exc}")
        raise typer.Exit(1) from None
    console.print(f"revoked key {key_id}")


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Job spec JSON.")],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    watch_: Annotated[bool, typer.Option("--watch", help="Follow progress, then report.")
                      ] = False,
) -> None:
    """Submit a job spec; prints the job id."""
    from service.client import print_report, watch

    try:
        spec = json.loads(file.read_text())
    except ValueError as exc:
        err.print(f"[red]{file} is not valid JSON: {exc}")
        raise typer.Exit(2) from None
    client = _client(url, key)
    # One Idempotency-Key for every attempt: a submission whose answer was lost is sent again
    # and still makes one job.
    job = _api_call(lambda: client.submit(spec, on_retry=err.print))
    console.print(f"submitted job {job['id']} ({job['name']}): {job['n_trials']} trials")
    if watch_:
        _api_call(watch, client, job["id"], console)
        print_report(_api_call(client.report, job["id"]), console)


@app.command("jobs")
def list_jobs(url: UrlOpt = "http://127.0.0.1:8000", key: KeyOpt = None) -> None:
    """List your jobs."""
    from rich.table import Table

    body = _api_call(_client(url, key).jobs)
    t = Table(title=f"{body['count']} jobs")
    for col in ("id", "name", "status", "finished", "pruned", "failed", "best"):
        t.add_column(col)
    for j in body["data"]:
        best = j["best_value"]
        t.add_row(str(j["id"]), j["name"], j["status"], f"{j['finished']}/{j['n_trials']}",
                  str(j["counts"]["pruned"]), str(j["counts"]["failed"]),
                  f"{best:.4f}" if best is not None else "-")
    console.print(t)


@app.command("watch")
def watch_job(job_id: int, url: UrlOpt = "http://127.0.0.1:8000", key: KeyOpt = None) -> None:
    """Follow a job with a progress bar until it ends."""
    from service.client import watch

    job = _api_call(watch, _client(url, key), job_id, console)
    console.print(f"job {job_id} {job['status']}")


class ReportFormat(StrEnum):
    """What `hptune report --format` asks the API for."""

    json = "json"
    html = "html"
    csv = "csv"


@app.command()
def report(
    job_id: int,
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    format_: Annotated[ReportFormat | None, typer.Option(
        "--format", help="The API's rendering: json, html (one self-contained page with the "
        "pictures) or csv (a row per trial). Default: tables on the console, or the format "
        "the --output file's suffix names.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, help="Write the report to this file.")] = None,
) -> None:
    """Print the early-stopped trial report of a job, or save it as JSON, HTML or CSV."""
    from service.client import print_report

    if format_ is None and output is not None:
        try:
            format_ = ReportFormat(output.suffix.removeprefix(".").lower())
        except ValueError:
            err.print(f"[red]cannot tell the format from {output.name}: pass --format "
                      "json, html or csv")
            raise typer.Exit(2) from None
    client = _client(url, key)
    if format_ is None:
        print_report(_api_call(client.report, job_id), console)
        return
    body = _api_call(client.report_as, job_id, format_.value)
    if output is None:
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
        return
    write_output(output, body, err)
    err.print(f"wrote the {format_.value} report of job {job_id} to {output}")


@app.command()
def cancel(job_id: int, url: UrlOpt = "http://127.0.0.1:8000", key: KeyOpt = None) -> None:
    """Cancel a job."""
    job = _api_call(_client(url, key).cancel, job_id)
    console.print(f"job {job_id} {job['status']}")


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(
        help="Interface to listen on (loopback unless you mean to expose it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
) -> None:
    """Serve optuna-dashboard on the service's database, behind the API's login: every key
    sees its owner's jobs (an admin every job), read-only; a job's study is `job-<id>`."""
    import uvicorn

    from service.dashboard import create_dashboard_app
    from service.dashboard_login import LOGIN_PATH
    from service.migrate import upgrade
    from service.scheduler import open_database

    _setup_logging()
    db = open_database(_settings())
    upgrade(db)  # the sessions table, should this start before the API has upgraded
    console.print(f"optuna-dashboard on http://{host}:{port}{LOGIN_PATH}", soft_wrap=True)
    uvicorn.run(create_dashboard_app(db), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    app()
