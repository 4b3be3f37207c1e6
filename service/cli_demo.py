"""`hptune demo`: start the service on a fresh SQLite file, run a 20-trial digits job with a
progress bar, print its report (the README's first command, `make demo`).

service/cli.py adds it to `hptune`, and its helpers are imported when the command runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from service.spawn import (
    WORKER_STOP_TIMEOUT_S,
    cli_create_key,
    free_port,
    spawn_service,
    wait_healthy,
)

demo_app = typer.Typer()

DEMO_SPEC = {
    "name": "digits-demo",
    "dataset": "digits",
    "n_trials": 20,
    "max_epochs": 30,
    "metric": "val_accuracy",
    "search_space": {
        "learning_rate": {"low": 1e-4, "high": 0.3, "log": True},
        "batch_size": {"choices": [16, 32, 64, 128, 256]},
        "dropout": {"low": 0.0, "high": 0.6},
        "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
    },
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "hyperband"},
    "early_stopping": {"patience": 5, "min_delta": 0.0},
    "model": {"hidden_layers": [128, 64], "activation": "relu", "optimizer": "adam"},
}


@demo_app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo's database and logs go.")
                       ] = Path("hptune-demo"),
    workers: Annotated[int, typer.Option(min=1)] = 2,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the server up afterwards.")
                    ] = False,
) -> None:
    """Start the service on a fresh SQLite file, run a 20-trial digits job, print its report."""
    from service.cli import _api_call, console, err
    from service.client import Client, print_report, watch

    workdir.mkdir(parents=True, exist_ok=True)
    db_path = (workdir / "hptune.db").resolve()
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    env = {**os.environ, "HPTUNE_DATABASE_URL": f"sqlite:///{db_path}"}
    spec_path = workdir / "job.json"
    spec_path.write_text(json.dumps(DEMO_SPEC, indent=2))
    key = cli_create_key(env, "demo", timeout=None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "serve.log"
    console.print(f"starting hptune on {url} with {workers} workers (log: {log_path})")
    with open(log_path, "w") as log_file:
        server = spawn_service(["serve", "--port", str(port), "--workers", str(workers)],
                               env, log_file)
    try:
        client = Client(url, key)
        if not wait_healthy(url, server, timeout_s=60, interval_s=0.3):
            err.print(f"[red]the server did not start; see {log_path}")
            raise typer.Exit(1)
        job = _api_call(client.submit, DEMO_SPEC)
        console.print(f"submitted job {job['id']}: {DEMO_SPEC['n_trials']} trials of "
                      f"{DEMO_SPEC['dataset']} (TPE sampler, Hyperband pruner, patience 5)")
        _api_call(watch, client, job["id"], console)
        print_report(_api_call(client.report, job["id"]), console)
        console.print(f"\nAPI docs: [bold]{url}/docs[/]   job JSON: {url}/api/v1/jobs/{job['id']}")
        if keep:
            console.print(f"serving until Ctrl-C; API key: {key}")
            server.wait()
        else:
            console.print("(the demo server stops now; `hptune demo --keep` keeps it up)")
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=WORKER_STOP_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                server.kill()

