"""Process identities: which worker process runs a trial, and whether that process is gone.

A worker stamps each trial it starts with its identity. A reaper on the same host, in the
same PID namespace, can then tell at once that the process died (kill -9, out of memory)
instead of waiting out the heartbeat grace period. Anywhere else (another machine or
container, a system without /proc) nothing is known and the heartbeat decides, as before.

The identity is "pid namespace/boot id/host/pid/start time": the start time (in clock ticks
since boot, from /proc/<pid>/stat) tells a reused PID from the original process.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

# The system attribute of a trial that names the process running it.
WORKER_PROCESS_ATTR = "hptune:worker_process"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # Field 22 (starttime); the command name in field 2 may hold spaces, so split after ")".
    return stat.rsplit(")", 1)[1].split()[19]


def _host_part() -> str | None:
    """Namespace, boot and host: where a PID means the same process."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    boot = _read("/proc/sys/kernel/random/boot_id")
    if boot is None:
        return None
    return f"{namespace}/{boot.strip()}/{socket.gethostname()}"


def process_identity() -> str | None:
    """This process's identity, or None where /proc cannot tell."""
    host, start = _host_part(), _start_time(os.getpid())
    if host is None or start is None:
        return None
    return f"{host}/{os.getpid()}/{start}"


def process_gone(identity: str) -> bool:
    """True only when `identity` is a process of this host and PID namespace that no longer
    runs; False when it runs or when this process cannot know (elsewhere)."""
    parts = identity.rsplit("/", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    host, pid, start = parts
    if host != _host_part():
        return False
    return _start_time(int(pid)) != start
