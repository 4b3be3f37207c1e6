"""`hptune extend ID N` and `hptune resume ID`: raise a job's n_trials, resume a cancelled job.

service/cli.py adds these commands to `hptune` (the REST side is service/lifecycle.py). They
use that module's helpers, imported when a command runs: service/cli.py imports this module.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

lifecycle_app = typer.Typer()

# As service/cli.py's UrlOpt and KeyOpt (not importable from there while it imports this).
UrlOpt = Annotated[str, typer.Option(envvar="HPTUNE_URL", help="API base URL.")]
KeyOpt = Annotated[str | None, typer.Option(envvar="HPTUNE_API_KEY", help="API key.")]
WatchOpt = Annotated[bool, typer.Option("--watch", help="Follow progress until the job ends.")]


@lifecycle_app.command()
def extend(
    job_id: Annotated[int, typer.Argument(help="The job's id.")],
    n_trials: Annotated[int, typer.Argument(help="Its new number of trials (more than now).")],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    watch_: WatchOpt = False,
) -> None:
    """Raise a job's n_trials, keeping its study: a succeeded job runs again."""
    from service.cli import _api_call, _client

    client = _client(url, key)
    _show(client, _api_call(client.extend, job_id, n_trials), watch_)


@lifecycle_app.command()
def resume(
    job_id: Annotated[int, typer.Argument(help="The job's id.")],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    watch_: WatchOpt = False,
) -> None:
    """Resume a cancelled job where it stopped, to exactly its n_trials."""
    from service.cli import _api_call, _client

    client = _client(url, key)
    _show(client, _api_call(client.resume, job_id), watch_)


def _show(client: Any, job: dict[str, Any], watch_: bool) -> None:
    """Print the job's status and count; with --watch, follow it until it ends."""
    from service.cli import _api_call, console
    from service.client import watch

    console.print(f"job {job['id']} {job['status']}: {job['finished']}/{job['n_trials']} "
                  "trials finished")
    if watch_:
        job = _api_call(watch, client, job["id"], console)
        console.print(f"job {job['id']} {job['status']}")
