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


# PgBouncer: Debian's package puts the program in /usr/sbin, which a plain user's PATH lacks.
PGBOUNCER_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
# The configuration the tests and benchmarks run (README, "Many workers"): transaction pooling,
# at most `default_pool_size` server connections per database, many more clients.
PGBOUNCER_INI = """\
[databases]
* = host=127.0.0.1 port={pg_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/userlist.txt
admin_users = postgres
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = {max_clients}
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
"""


def find_pgbouncer() -> str | None:
    found = shutil.which("pgbouncer")
    return found or next((p for p in PGBOUNCER_PATHS if os.path.exists(p)), None)


def pgbouncer_unavailable_reason() -> str | None:
    """Why no throwaway PostgreSQL plus PgBouncer can start here, or None when they can."""
    reason = unavailable_reason()
    if reason is None and find_pgbouncer() is None:
        reason = ("pgbouncer not found on PATH or in /usr/sbin; install it "
                  "(Debian: apt-get install pgbouncer)")
    return reason


@dataclass
class PgBouncer:
    """A throwaway PgBouncer in front of `server`, in transaction pooling mode; its own
    temporary directory and free loopback port, run as `postgres` under root."""

    server: PostgresServer
    pool_size: int = 10
    max_clients: int = 2000
    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hptune-pgb-")))
    proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30) -> PgBouncer:
        program = find_pgbouncer()
        if program is None:
            raise RuntimeError(pgbouncer_unavailable_reason() or "no pgbouncer")
        ini = self.root / "pgbouncer.ini"
        ini.write_text(PGBOUNCER_INI.format(pg_port=self.server.port, port=self.port,
                                            root=self.root, pool_size=self.pool_size,
                                            max_clients=self.max_clients))
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        cmd = [program, str(ini)]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            pw = pwd.getpwnam("postgres")
            for p in (self.root, *self.root.iterdir()):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited:\n{self.log()}")
            try:
                self.show("VERSION")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not answer:\n{self.log()}") from None
                time.sleep(0.1)

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database` through PgBouncer."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self):  # -> psycopg.Connection
        """A connection to PgBouncer's admin console (which speaks only the simple query
        protocol: psycopg's ClientCursor)."""
        import psycopg

        dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=pgbouncer"
        return psycopg.connect(dsn, autocommit=True, connect_timeout=5,
                               cursor_factory=psycopg.ClientCursor)

    def show(self, what: str, conn=None) -> list[dict]:
        """`SHOW <what>` on the admin console (on `conn`, or a connection of its own)."""
        from psycopg.rows import dict_row

        if conn is None:
            with self.admin() as own:
                return self.show(what, own)
        cur = conn.cursor(row_factory=dict_row)
        cur.execute(f"SHOW {what}")
        return cur.fetchall() if cur.description else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.root / "pgbouncer.log").read_text()[-3000:]
        except OSError:
            return ""


class ConnectionWatch:
    """Polls, in a thread, how many connections PostgreSQL's server has open to `database`
    (pg_stat_activity; the watcher's own sits in another database) and, given `bouncer`, how
    many client connections PgBouncer holds for it (SHOW POOLS); keeps the peaks.

    `peak_per_process` is the most server connections one application_name held (direct
    connections: one name per process, `hptune-<role>-<pid>`).
    """

    def __init__(self, server: PostgresServer, database: str, bouncer: PgBouncer | None = None,
                 interval_s: float = 0.05) -> None:
        import threading

        self.server, self.database, self.bouncer = server, database, bouncer
        self.interval_s = interval_s
        self.peak_server = self.peak_clients = self.peak_per_process = self.samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pg-watch")

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import psycopg

        query = ("SELECT application_name, COUNT(*) FROM pg_stat_activity "
                 "WHERE datname = %s AND backend_type = 'client backend' GROUP BY 1")
        admin = self.bouncer.admin() if self.bouncer is not None else None
        with psycopg.connect(self.server.dsn(), autocommit=True, connect_timeout=10) as conn:
            while not self._stop.is_set():
                try:
                    rows = conn.execute(query, (self.database,)).fetchall()
                    self.peak_server = max(self.peak_server, sum(n for _, n in rows))
                    self.peak_per_process = max([self.peak_per_process,
                                                 *(n for name, n in rows if name)])
                    if self.bouncer is not None:
                        pools = [p for p in self.bouncer.show("POOLS", admin)
                                 if p["database"] == self.database]
                        clients = sum(p["cl_active"] + p["cl_waiting"] for p in pools)
                        self.peak_clients = max(self.peak_clients, clients)
                    else:
                        self.peak_clients = self.peak_server
                    self.samples += 1
                except Exception as exc:  # recorded: a test asserts there were none
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(self.interval_s)
        if admin is not None:
            admin.close()
