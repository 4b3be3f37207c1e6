"""Storage backends and real multi-process clusters for the reliability tests.

`backend` runs a test once on SQLite and once on PostgreSQL (a real throwaway server that the
session starts itself, see tests/postgres.py). Without PostgreSQL's server programs the
PostgreSQL half skips with the reason; with HPTUNE_REQUIRE_POSTGRES=1 (CI) it fails instead.

`cluster` starts `hptune serve --workers 0` and standalone `python -m service worker`
processes on the backend's database, so tests can signal single workers (SIGKILL, SIGTERM),
restart everything, or stop the database under them.

`measure` records a measured figure (a wall-time ratio, a latency): pytest prints them all in
a "measurements" section of its terminal summary, so they reach the CI log without `-s`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.spawn import free_port, spawn_service, tls_context, wait_healthy
from tests.conftest import MEASUREMENTS, ROOT, create_key_in_process
from tests.postgres import PostgresServer, unavailable_reason
from tests.service.crashes import CRASH_ENV

# Settings every test cluster runs with: fast crash detection and polling.
CLUSTER_ENV = {
    "HPTUNE_HEARTBEAT_INTERVAL": "1",
    "HPTUNE_GRACE_PERIOD": "3",
    "HPTUNE_POLL_INTERVAL": "0.2",
    "HPTUNE_MAX_TRIAL_RETRIES": "2",
    "HPTUNE_LOG_LEVEL": "INFO",
    "HPTUNE_STOP_TIMEOUT": "20",
    "HPTUNE_MAX_ACTIVE_JOBS_PER_OWNER": "100",
}
# A tiny job: each trial trains a 16-unit network for at most 3 epochs on digits.
TINY_JOB = {
    "name": "tiny",
    "dataset": "digits",
    "n_trials": 12,
    "max_epochs": 3,
    "search_space": {"batch_size": {"choices": [64, 128, 256]}},
    "sampler": {"name": "tpe", "seed": 1, "n_startup_trials": 4},
    "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    "early_stopping": {"patience": 2},
    "model": {"hidden_layers": [16]},
}
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def measure(request, record_property):
    """measure(name, text): shown in the terminal summary (tests/conftest.py prints them, also
    those of pytest-xdist's worker processes), and a JUnit XML property."""
    lines = request.config.stash.setdefault(MEASUREMENTS, [])

    def record(name: str, text: str) -> None:
        record_property(name, text)
        lines.append(f"{request.node.nodeid}: {text}")

    return record


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole session (skips, or fails under CI)."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("HPTUNE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"HPTUNE_REQUIRE_POSTGRES=1 but PostgreSQL cannot start: {reason}")
        pytest.skip(f"PostgreSQL-backed test: {reason}")
    server = PostgresServer.create()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@dataclass
class Backend:
    """One storage backend with a fresh, empty database."""

    name: str
    url: str
    server: PostgresServer | None = None

    @property
    def is_postgres(self) -> bool:
        return self.name == "postgresql"


BACKENDS = ["sqlite", "postgresql"]


def _new_backend(request, tmp: Path, name: str) -> Backend:
    if name == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp / 'hptune.db'}")
    server = request.getfixturevalue("pg_server")
    server.ensure_running()
    return Backend("postgresql", server.create_database(), server)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Backend:
    """The storage-facing tests run once per backend, each on a fresh database."""
    return _new_backend(request, tmp_path, request.param)


@pytest.fixture(scope="module", params=BACKENDS)
def module_backend(request, tmp_path_factory) -> Backend:
    """Like `backend`, one fresh database shared by a module's tests (one cluster for all)."""
    return _new_backend(request, tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture
def postgres_backend(request, tmp_path) -> Backend:
    """A fresh PostgreSQL database, for the tests that only make sense there."""
    return _new_backend(request, tmp_path, "postgresql")


@dataclass
class Proc:
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""


@dataclass
class Cluster:
    """An API process (no embedded workers) and standalone worker processes on one database."""

    tmp: Path
    url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    key: str | None = None
    _n: int = 0
    # The helpers' own client (job, trials, submit), kept: a new httpx.Client costs about
    # 20 ms of CPU (its TLS context), and the waits below poll ten times a second.
    _http: httpx.Client | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **CLUSTER_ENV, "HPTUNE_DATABASE_URL": self.url, **self.extra_env}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, kind: str, args: list[str]) -> Proc:
        self._n += 1
        log_path = self.tmp / f"{kind}-{self._n}.log"
        with open(log_path, "w") as fh:
            proc = spawn_service(args, self.env, fh, cwd=ROOT)
        return Proc(proc, log_path)

    def start_api(self, wait: bool = True) -> Proc:
        self.api = self._spawn("api", ["serve", "--port", str(self.port), "--workers", "0"])
        if wait:
            self.wait_api()
        return self.api

    def wait_api(self, timeout_s: float = 90) -> None:
        if self.api is None:
            raise RuntimeError("the API exited:\n")
        if wait_healthy(self.base_url, self.api.proc, timeout_s):
            return
        if not self.api.alive():
            raise RuntimeError(f"the API exited:\n{self.api.log()}")
        raise RuntimeError(f"the API did not answer:\n{self.api.log()}")

    def start_workers(self, n: int) -> list[Proc]:
        new = [self._spawn("worker", ["worker"]) for _ in range(n)]
        self.workers += new
        return new

    def live_workers(self) -> list[Proc]:
        return [w for w in self.workers if w.alive()]

    def ensure_workers(self, n: int) -> list[Proc]:
        """Start workers until n are alive (a test before may have killed some)."""
        return self.start_workers(max(n - len(self.live_workers()), 0))

    def client(self) -> httpx.Client:
        if self.key is None:
            self.key = create_key_in_process(self.url, "alice")
        return httpx.Client(base_url=self.base_url, timeout=30, verify=tls_context(),
                            headers={"Authorization": f"Bearer {self.key}"})

    def _api(self) -> httpx.Client:
        if self._http is None:
            self._http = self.client()
        return self._http

    def submit(self, spec: dict) -> int:
        r = self._api().post("/api/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: int) -> dict:
        r = self._api().get(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def trials(self, job_id: int) -> list[dict]:
        r = self._api().get(f"/api/v1/jobs/{job_id}/trials")
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def wait_job(self, job_id: int, timeout_s: float = 180, settle: bool = True) -> dict:
        """Wait until the job ends; with `settle`, also until no trial is RUNNING or WAITING
        (a cancelled or timed-out job's last trials stop within an epoch)."""
        deadline = time.monotonic() + timeout_s
        job: dict = {}
        while time.monotonic() < deadline:
            try:
                job = self.job(job_id)
            except (httpx.HTTPError, AssertionError):
                time.sleep(0.2)
                continue
            if job["status"] in TERMINAL and (
                not settle or (job["counts"]["running"] == 0 and job["counts"]["waiting"] == 0)
            ):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not end: {job}\n{self.logs()}")

    def wait_finished(self, job_id: int, at_least: int, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["finished"] >= at_least or job["status"] in TERMINAL:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} stuck below {at_least} finished\n{self.logs()}")

    def pause_workers_mid_trial(self, job_id: int, timeout_s: float = 60) -> int:
        """SIGSTOP every live worker at a moment when the job has RUNNING trials; returns how
        many (exactly: a frozen worker cannot finish its trial while they are counted).

        The caller then acts on the frozen workers: kills them, or stops the database and
        resumes them (`resume_workers`).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.job(job_id)["counts"]["running"] > 0:
                for w in self.live_workers():
                    w.proc.send_signal(signal.SIGSTOP)
                running = self.job(job_id)["counts"]["running"]
                if running > 0:
                    return running
                self.resume_workers()  # the trials ended in between: try again
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never had a trial running\n{self.logs()}")

    def resume_workers(self) -> None:
        for w in self.live_workers():
            w.proc.send_signal(signal.SIGCONT)

    def kill_worker(self, w: Proc, sig: int = signal.SIGKILL) -> None:
        if w.alive():
            w.proc.send_signal(sig)

    def stop_workers(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        for w in self.workers:
            if w.alive():
                w.proc.send_signal(sig)
        for w in self.workers:
            try:
                w.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()

    def stop_api(self, sig: int = signal.SIGTERM) -> None:
        if self.api is not None and self.api.alive():
            self.api.proc.send_signal(sig)
            try:
                self.api.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.api.proc.kill()
                self.api.proc.wait()

    def stop(self) -> None:
        self.stop_workers()
        self.stop_api()

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for p in ([self.api] if self.api else []) + self.workers:
            parts.append(f"--- {p.log_path.name} (rc={p.proc.poll()})\n{p.log()[-tail:]}")
        return "\n".join(parts)

    def all_logs(self) -> str:
        return "\n".join(p.log() for p in ([self.api] if self.api else []) + self.workers)


def _cluster_factory(tmp: Path) -> tuple[list[Cluster], object]:
    made: list[Cluster] = []

    def make(url: str, **env: str) -> Cluster:
        c = Cluster(tmp / f"cluster-{len(made)}", url, dict(env))
        c.tmp.mkdir(parents=True, exist_ok=True)
        made.append(c)
        return c

    return made, make


def _kill_all(made: list[Cluster]) -> None:
    for c in made:
        try:
            c.stop_workers(signal.SIGKILL, timeout_s=10)
            c.stop_api(signal.SIGKILL)
        except Exception:
            pass
        if c._http is not None:
            c._http.close()


@pytest.fixture
def cluster_factory(tmp_path) -> Iterator:
    """make(url, **env) -> a Cluster (not started); every cluster is stopped at teardown."""
    made, make = _cluster_factory(tmp_path)
    yield make
    _kill_all(made)


@pytest.fixture(scope="module")
def module_cluster_factory(tmp_path_factory) -> Iterator:
    """Like cluster_factory, for clusters that a module's tests share."""
    made, make = _cluster_factory(tmp_path_factory.mktemp("clusters"))
    yield make
    _kill_all(made)


def check_trials(trials: list[dict], n_trials: int, max_retries: int = 2) -> dict[str, int]:
    """Assert a finished job's invariants; returns its trials counted by state.

    Exactly n_trials COMPLETE or PRUNED, nothing RUNNING or WAITING, unique numbers, and every
    retry linked to a FAIL trial with the same parameters, each failure retried at most once
    and no chain of crashes longer than the retry limit allows.
    """
    by_number = {t["number"]: t for t in trials}
    assert len(by_number) == len(trials), "trial numbers repeat"
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    finished = states.get("COMPLETE", 0) + states.get("PRUNED", 0)
    assert finished == n_trials, states
    assert states.get("RUNNING", 0) == 0 and states.get("WAITING", 0) == 0, states
    retried: dict[int, int] = {}
    for t in trials:
        d = t["details"]
        if "retry_of" not in d:
            continue
        history = d["retry_history"]
        assert history and history[0] == d["retry_of"], d
        parent = by_number[history[-1]]
        assert parent["state"] == "FAIL", (t, parent)
        # The same parameters (a worker killed inside Optuna's ask may have stored only some).
        assert parent["params"].items() <= t["params"].items(), (t, parent)
        retried[parent["number"]] = retried.get(parent["number"], 0) + 1
        handed_back = sum(by_number[n]["details"].get("stop_cause") == "handed_back"
                          for n in history)
        assert len(history) <= max_retries + handed_back, t
    assert all(v == 1 for v in retried.values()), f"a failure was retried twice: {retried}"
    return states


@pytest.fixture
def tiny_job() -> dict:
    """A copy of TINY_JOB to tweak."""
    import copy

    return copy.deepcopy(TINY_JOB)


@pytest.fixture(scope="module")
def crash_cluster(module_backend, module_cluster_factory):
    """An API whose workers crash on poison trials (tests.service.crashes.CRASH_ENV), shared
    by a module's tests per backend; the tests start the workers."""
    cluster = module_cluster_factory(module_backend.url, **CRASH_ENV)
    cluster.start_api()
    return cluster


@pytest.fixture(name="check_trials")
def check_trials_fixture():
    """check_trials(trials, n_trials, max_retries=2): the finished job's invariants."""
    return check_trials
