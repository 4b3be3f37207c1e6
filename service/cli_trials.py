"""`hptune trials ID [-o trials.json]`: a job's trials as a table (its last ones), or every
trial, page by page, as JSON (REST side: GET /api/v1/jobs/{id}/trials)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from service.cli_models import KeyOpt, UrlOpt, write_output

if TYPE_CHECKING:
    from service.client import Client

trials_app = typer.Typer()

# Trials `hptune trials` prints at most (the last ones; `-o FILE.json` writes every one).
TERMINAL_TRIAL_ROWS = 50


def trial_tail(client: Client, job_id: int, n: int) -> tuple[list[dict], int]:
    """The job's last `n` trials and its trial count, in two page reads at most (a job's
    trial numbers run 0..count-1, so the last `n` are those after number count-n-1)."""
    path = f"/api/v1/jobs/{job_id}/trials"
    page = next(client.pages(path, limit=n))
    if page["count"] > n:  # the query in the path, as in a `next` link (params would drop it)
        page = next(client.pages(f"{path}?after={page['count'] - n - 1}&limit={n}"))
    return page["data"], page["count"]


def print_trials(job_id: int, rows: list[dict], count: int, out: Console) -> None:
    """`rows` (the last of the job's `count` trials) as a table, then a line saying how many
    were left out and how to get every one."""
    from rich.table import Table

    from service.client import _fmt

    t = Table(title=f"job {job_id}: {count} trials",
              caption="epochs: the epoch it stopped at / its best epoch")
    params = list(dict.fromkeys(k for r in rows for k in r["params"]))
    # Number, state, value and epochs are never cut; in a narrow terminal the stop reason and
    # the parameters wrap instead.
    for col in ("#", "state", "value", "epochs"):
        t.add_column(col, no_wrap=True, justify="left" if col == "state" else "right")
    for col in ("stop reason", *params):
        t.add_column(col, overflow="fold")
    for r in rows:
        epochs = (f"{_fmt(r['stopped_epoch'])}/{_fmt(r['best_epoch'])}"
                  if r["stopped_epoch"] is not None or r["best_epoch"] is not None else "-")
        t.add_row(str(r["number"]), r["state"].lower(), _fmt(r["value"]), epochs,
                  r["stop_reason"] or "-", *(_fmt(r["params"].get(k)) for k in params))
    out.print(t)
    if count > len(rows):
        out.print(f"the last {len(rows)} trials shown, {count - len(rows)} earlier ones left "
                  f"out: `hptune trials {job_id} -o trials.json` writes every one",
                  soft_wrap=True)


@trials_app.command()
def trials(
    job_id: int,
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, help="Write every trial (all pages) to this .json "
        "file: {\"job_id\", \"count\", \"trials\": [the API's trials, in number order]}.")] = None,
) -> None:
    """Print a job's trials as a table (the last 50 of a longer job), or save all as JSON."""
    from service.cli import _api_call, _client, console, err

    if output is not None and output.suffix.lower() != ".json":
        err.print(f"[red]cannot write trials as {output.name}: name a .json file")
        raise typer.Exit(2)
    client = _client(url, key)
    if output is None:
        rows, count = _api_call(trial_tail, client, job_id, TERMINAL_TRIAL_ROWS)
        print_trials(job_id, rows, count, console)
        return
    data = _api_call(client.trials, job_id)["data"]
    body = json.dumps({"job_id": job_id, "count": len(data), "trials": data}, indent=1)
    write_output(output, body.encode(), err)
    err.print(f"wrote the {len(data)} trials of job {job_id} to {output}")
