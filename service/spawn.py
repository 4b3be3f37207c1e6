"""The service's child processes: the workers `hptune serve` embeds (and stops), and a
whole server on loopback (a free port, `python -m service ...` with its output in a log,
waiting until the API answers /healthz, an API key from the CLI).

One helper for everything that starts a real server: `hptune demo`, the tests' server
fixtures (tests/conftest.py `start_server`, tests/service/conftest.py `Cluster`) and the
benchmarks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

# Seconds a worker gets to finish its epoch and hand back its trial after SIGTERM.
WORKER_STOP_TIMEOUT_S = 30
# Linux prctl option: the signal a child gets when its parent dies.
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies, so embedded workers never outlive it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own shutdown still stops its workers


def spawn_workers(n: int, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """`n` embedded `python -m service worker` processes that die with this one."""
    return [subprocess.Popen([sys.executable, "-m", "service", "worker"], env=env,
                             preexec_fn=_die_with_parent)
            for _ in range(n)]


def stop_workers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, then up to WORKER_STOP_TIMEOUT_S for them all to finish, then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_service(args: Sequence[str], env: Mapping[str, str], log: IO,
                  cwd: Path | None = None) -> subprocess.Popen:
    """`python -m service *args` (e.g. `serve --port P --workers N`, `worker`), its stdout and
    stderr written to `log`, an open file."""
    return subprocess.Popen([sys.executable, "-m", "service", *args], env=dict(env), cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context for all of a process's HTTP clients (`verify=`): httpx
    otherwise builds one for every client it makes, loading the CA bundle each time (some
    20 ms of CPU; the test suite made hundreds)."""
    import ssl

    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float,
                 interval_s: float = 0.2) -> bool:
    """Poll `url`/healthz until it answers 200 (True); False once `proc` has exited or
    `timeout_s` has passed (`proc.poll()` tells the two apart)."""
    import httpx  # here: the processes the service spawns import this module, and need no HTTP

    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1, verify=tls_context()) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                if http.get(f"{url}/healthz").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(interval_s)
    return False


def cli_create_key(env: Mapping[str, str], owner: str, admin: bool = False,
                   cwd: Path | None = None, timeout: float | None = 120) -> str:
    """A new API key from `hptune keys create --owner OWNER [--admin]` (its last line)."""
    args = ["keys", "create", "--owner", owner] + (["--admin"] if admin else [])
    out = subprocess.run([sys.executable, "-m", "service", *args], env=dict(env), cwd=cwd,
                         capture_output=True, text=True, check=True, timeout=timeout)
    return out.stdout.strip().splitlines()[-1]
