"""Fixtures shared by every suite: a real `hptune serve` process (`start_server`, the session's
`server`, also used by the benchmarks) and API keys, on the helpers of service/spawn.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.spawn import free_port, spawn_service, tls_context, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
# The lines of the `measure` fixture (tests/service/conftest.py), printed in a "measurements"
# section of the terminal summary. Here, not there: under pytest-xdist the controlling process
# loads only this conftest and gets each worker process's lines when that worker ends.
MEASUREMENTS = pytest.StashKey[list[str]]()
WORKER_MEASUREMENTS = "hptune_measurements"


def pytest_sessionfinish(session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)  # a pytest-xdist worker
    if workeroutput is not None:
        workeroutput[WORKER_MEASUREMENTS] = session.config.stash.get(MEASUREMENTS, [])


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With `-m serial` (make test's second phase), skip the test modules that cannot hold a
    serial test: the word is not in their source. Importing and collecting all of them only
    to deselect them took about 10 s (schemathesis builds its cases at collection)."""
    if (config.option.markexpr != "serial" or collection_path.suffix != ".py"
            or not collection_path.name.startswith("test_")):
        return None
    return "serial" not in collection_path.read_text(encoding="utf-8") or None


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist, in the controlling process: a worker's measurements."""
    lines = getattr(node, "workeroutput", {}).get(WORKER_MEASUREMENTS, [])
    node.config.stash.setdefault(MEASUREMENTS, []).extend(lines)


def pytest_terminal_summary(terminalreporter, config) -> None:
    lines = config.stash.get(MEASUREMENTS, [])
    if lines:
        terminalreporter.section("measurements")
        for line in lines:
            terminalreporter.write_line(line)


def hptune(*args: str, env: dict[str, str], check: bool = True, timeout: float = 120
           ) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "service", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=check, timeout=timeout)


def create_key(env: dict[str, str], owner: str, admin: bool = False) -> str:
    """A new API key written straight to the server's database (its schema exists once the
    server answers): no CLI start-up per key. `hptune keys create` itself is tested in
    tests/service/test_security.py."""
    return create_key_in_process(env["HPTUNE_DATABASE_URL"], owner, admin)


def create_key_in_process(url: str, owner: str, admin: bool = False) -> str:
    from service.db import Database
    from service.keys import create_key as store_key
    from service.settings import Settings

    db = Database(Settings(database_url=url), role="test")
    try:
        with db.session() as s:
            _, secret = store_key(s, owner, admin)
        return secret
    finally:
        db.dispose()


@dataclass
class Server:
    """A running `hptune serve` process on loopback."""

    url: str
    env: dict[str, str]
    proc: subprocess.Popen
    log_path: Path
    keys: dict[str, str] = field(default_factory=dict)

    def client(self, owner: str = "alice") -> httpx.Client:
        if owner not in self.keys:
            self.keys[owner] = create_key(self.env, owner)
        return httpx.Client(base_url=self.url, timeout=30, verify=tls_context(),
                            headers={"Authorization": f"Bearer {self.keys[owner]}"})

    def wait_job(self, client: httpx.Client, job_id: int, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish; server log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]


def start_server(tmp: Path, database_url: str | None = None, workers: int = 2,
                 extra_env: dict[str, str] | None = None) -> Server:
    env = {**os.environ,
           "HPTUNE_DATABASE_URL": database_url or f"sqlite:///{tmp / 'hptune.db'}",
           "HPTUNE_HEARTBEAT_INTERVAL": "1", "HPTUNE_GRACE_PERIOD": "4",
           **(extra_env or {})}
    port = free_port()
    log_path = tmp / f"serve-{port}.log"
    with open(log_path, "w") as fh:
        proc = spawn_service(["serve", "--port", str(port), "--workers", str(workers)],
                             env, fh, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    if wait_healthy(url, proc, timeout_s=60):
        return Server(url, env, proc, log_path)
    if proc.poll() is not None:
        raise RuntimeError(f"hptune serve exited:\n{log_path.read_text()}")
    proc.kill()
    raise RuntimeError(f"hptune serve did not answer:\n{log_path.read_text()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    """One `hptune serve --workers 2` on a fresh SQLite file for the whole session."""
    srv = start_server(tmp_path_factory.mktemp("serve"))
    yield srv
    stop_server(srv)


@contextlib.contextmanager
def in_process_app(db_path: Path, **settings: Any) -> Iterator[tuple[Any, Any]]:
    """The API in process (a TestClient) on a real SQLite file at `db_path`, with keys for
    alice (the client's default), bob and an admin ("ops"): (client, db). `client.keys`
    holds bob's and the admin's; key_headers(client, "bob") sends one of them."""
    from starlette.testclient import TestClient

    from service import scheduler
    from service.api import create_app
    from service.keys import create_key as store_key
    from service.migrate import upgrade
    from service.settings import Settings

    config = Settings(database_url=f"sqlite:///{db_path}", **settings)
    db = scheduler.open_database(config)
    upgrade(db)
    with db.session() as s:
        _, key = store_key(s, "alice")
        _, bob = store_key(s, "bob")
        _, admin = store_key(s, "ops", is_admin=True)
    try:
        with TestClient(create_app(config, db)) as client:
            client.headers["Authorization"] = f"Bearer {key}"
            client.keys = {"bob": bob, "admin": admin}
            yield client, db
    finally:
        db.dispose()


def key_headers(client: Any, who: str) -> dict[str, str]:
    """The Authorization header of `who`'s key on an in_process_app client."""
    return {"Authorization": f"Bearer {client.keys[who]}"}
