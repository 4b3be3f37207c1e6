"""Load on the REST API: concurrent clients submitting, listing and reading jobs.

    .venv/bin/python benchmarks/api_load.py --clients 50 --seconds 30

Starts `hptune serve --workers 2` on a fresh SQLite file and, in the same run, a bare FastAPI
app with one endpoint under the same uvicorn; drives both with the same number of concurrent
clients and prints requests per second and p50/p99 latency, so the service's figures can be
read against what FastAPI itself costs on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = {"name": "load", "n_trials": 1, "max_epochs": 1, "model": {"hidden_layers": [8]},
            "search_space": {"batch_size": {"choices": [256]}}}
# A client submits at most one job per this many seconds; the rest of its requests are reads.
SUBMIT_EVERY_S = 2.0


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    created: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, status: int, latency: float) -> None:
        self.latencies_s.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_s)
        return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else float("nan")

    def summary(self) -> dict:
        return {"requests": len(self.latencies_s), "rps": round(self.rps, 1),
                "p50_ms": round(self.pct(0.50) * 1000, 1),
                "p99_ms": round(self.pct(0.99) * 1000, 1), "statuses": self.statuses,
                "created": len(self.created), "errors": len(self.errors)}


def _run(result: LoadResult, threads: list[threading.Thread]) -> LoadResult:
    """Run the client threads together; `result.seconds` is their wall time."""
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - t0
    return result


def drive_service(url: str, keys: list[str], seconds: float) -> LoadResult:
    """One thread per key: submit a tiny job now and then, list and read jobs in between."""
    result = LoadResult()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(key: str) -> None:
        own: list[int] = []
        next_submit = time.monotonic()
        with httpx.Client(base_url=url, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as c:
            while time.monotonic() < stop_at:
                try:
                    t0 = time.perf_counter()
                    if time.monotonic() >= next_submit:
                        r = c.post("/api/v1/jobs", json=TINY_JOB)
                        next_submit = time.monotonic() + SUBMIT_EVERY_S
                        if r.status_code == 201:
                            own.append(r.json()["id"])
                    elif own and len(own) % 2:
                        r = c.get(f"/api/v1/jobs/{own[-1]}")
                    else:
                        r = c.get("/api/v1/jobs", params={"limit": 10})
                    dt = time.perf_counter() - t0
                    with lock:
                        result.record(r.status_code, dt)
                except httpx.HTTPError as exc:
                    with lock:
                        result.errors.append(repr(exc))
        with lock:
            result.created.extend(own)

    return _run(result, [threading.Thread(target=client, args=(k,)) for k in keys])


def drive_bare(url: str, clients: int, seconds: float) -> LoadResult:
    result = LoadResult()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                r = c.get("/ping")
                with lock:
                    result.record(r.status_code, time.perf_counter() - t0)

    return _run(result, [threading.Thread(target=client) for _ in range(clients)])


BARE_APP = """
from fastapi import FastAPI
app = FastAPI()

@app.get("/ping")
def ping():
    return {"status": "ok"}
"""


def start_bare(tmp: Path, port: int) -> subprocess.Popen:
    (tmp / "bare_app.py").write_text(BARE_APP)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port),
                             "--log-level", "warning"], cwd=tmp)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("bare app did not start")


def make_keys(database_url: str, n: int) -> list[str]:
    """Keys for n owners, made straight in the database (the CLI would take a process each)."""
    from service.keys import create_key
    from service.migrate import upgrade
    from service.scheduler import open_database
    from service.settings import Settings

    db = open_database(Settings(database_url=database_url))
    upgrade(db)
    keys = []
    with db.session() as s:
        for i in range(n):
            keys.append(create_key(s, f"load-{i}")[1])
    db.dispose()
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS_api_load.json"),
                    help="where to write the figures as JSON (default: %(default)s)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from service.spawn import free_port
    from tests.conftest import start_server, stop_server

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        db_url = f"sqlite:///{tmp / 'load.db'}"
        keys = make_keys(db_url, args.clients)
        server = start_server(tmp, db_url, workers=2)
        try:
            svc = drive_service(server.url, keys, args.seconds)
        finally:
            stop_server(server)
        port = free_port()
        bare = start_bare(tmp, port)
        try:
            base = drive_bare(f"http://127.0.0.1:{port}", args.clients, args.seconds)
        finally:
            bare.terminate()
            bare.wait()
    report = {"clients": args.clients, "seconds": args.seconds, "cpus": os.cpu_count(),
              "service": svc.summary(), "bare_fastapi": base.summary(),
              "rps_ratio_service_over_bare": round(svc.rps / base.rps, 3) if base.rps else None}
    text = json.dumps(report, indent=2)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
