"""A real, throwaway PostgreSQL server for tests and benchmarks: no mocks, no Docker.

`PostgresServer.start()` runs `initdb` and `pg_ctl` from the machine's PostgreSQL server
programs on a free loopback port in a temporary directory. PostgreSQL refuses to run as root,
so under root the programs run as the `postgres` system user (`runuser -u postgres`), which
must own the directory. Authentication is `trust` on 127.0.0.1 only, the Unix socket lives in
the temporary directory, and durability is off (fsync, full-page writes): the data is
thrown away with the directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.spawn import free_port

# Programs the server needs, looked up on PATH and then in Debian's versioned directories.
PROGRAMS = ("initdb", "pg_ctl", "postgres")
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
# Seconds pg_ctl waits for the server to start or stop.
PG_CTL_TIMEOUT_S = 60


def find_bindir() -> Path | None:
    """The directory that holds initdb, pg_ctl and postgres, or None if they are absent."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob(DEBIAN_BIN_GLOB), reverse=True)]
    for d in candidates:
        if all((d / p).exists() for p in PROGRAMS):
            return d
    return None


def unavailable_reason() -> str | None:
    """Why no throwaway server can start here, or None when one can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install -e '.[postgres]')"
    if find_bindir() is None:
        return ("PostgreSQL server programs (initdb, pg_ctl, postgres) not found on PATH or in "
                f"{DEBIAN_BIN_GLOB}; install postgresql (Debian: apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no `postgres` system user to run the server"
        if shutil.which("runuser") is None:
            return "running as root but `runuser` is missing"
    return None


@dataclass
class PostgresServer:
    """One throwaway cluster; `stop()`/`start()` may be called again to simulate an outage."""

    bindir: Path
    root: Path
    port: int = field(default_factory=free_port)
    user: str = "postgres"
    _n_databases: int = 0

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @classmethod
    def create(cls) -> PostgresServer:
        """initdb a cluster in a fresh temporary directory (owned by `postgres` under root)."""
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(unavailable_reason() or "no PostgreSQL")
        root = Path(tempfile.mkdtemp(prefix="hptune-pg-"))
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(root, pw.pw_uid, pw.pw_gid)
        server = cls(bindir=bindir, root=root)
        server._run("initdb", "-D", str(server.datadir), "-U", server.user, "-A", "trust",
                    "-E", "UTF8", "--no-sync", "--no-instructions")
        hba = server.datadir / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        if os.geteuid() == 0:
            os.chown(hba, pw.pw_uid, pw.pw_gid)
        return server

    def _run(self, prog: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / prog), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check,
                              timeout=PG_CTL_TIMEOUT_S + 30, cwd=self.root)

    def start(self) -> None:
        """Start (or restart) the server on its port and wait until it accepts connections."""
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=300 -c shared_buffers=64MB")
        res = self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-o", opts,
                        "-w", "-t", str(PG_CTL_TIMEOUT_S), "start", check=False)
        if res.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{res.stdout}{res.stderr}\n{self.log()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` ends every client connection at once, as an outage does."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w",
                  "-t", str(PG_CTL_TIMEOUT_S), "stop", check=False)

    def running(self) -> bool:
        res = self._run("pg_ctl", "-D", str(self.datadir), "status", check=False)
        return res.returncode == 0

    def ensure_running(self) -> None:
        """Start the server if a test stopped it (an outage test that failed half-way)."""
        if not self.running():
            self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL for psycopg 3."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run one statement in autocommit mode and return its rows (if any)."""
        import psycopg

        with psycopg.connect(self.dsn(database), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def create_database(self, prefix: str = "hptune_test") -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        self._n_databases += 1
        name = f"{prefix}_{os.getpid()}_{self._n_databases}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def wait_ready(self, timeout_s: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def log(self) -> str:
        try:
            return self.logfile.read_text()[-3000:]
        except OSError:
            return ""
