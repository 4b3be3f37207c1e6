"""Dataset uploads against a real server process: memory and CPU of hostile uploads, per-owner
dataset quotas, and DELETE /api/v1/datasets/{id}.

The memory cases each start a fresh `hptune serve --workers 0` and read the process's peak
resident set (VmHWM in /proc/<pid>/status) around one upload, so that one case's high-water
mark or retained heap cannot hide another's.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import Server, create_key, start_server, stop_server

# The bound the README states: one hostile upload raises the API process's peak RSS by less
# than this over the idle server (the upload's own bytes included).
RSS_GROWTH_BOUND_MB = 150
# CPU seconds the server may spend refusing (or parsing) the 16k-column header: the quadratic
# duplicate check took 4.6 s; a linear one takes milliseconds.
HEADER_CPU_BOUND_S = 0.5

GOOD_JOB = {"name": "uses-upload", "n_trials": 2, "max_epochs": 2,
            "model": {"hidden_layers": [16]}}

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="reads peak RSS and CPU time from /proc (Linux)")


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where /proc does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _csv(rows) -> bytes:
    return "\n".join(",".join(map(str, r)) for r in rows).encode()


def _small_csv(n: int = 60, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    return _csv([["a", "b", "c", "label"]] + [[*map(float, x), int(t)]
                                              for x, t in zip(X, y, strict=True)])


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _int8_bomb() -> bytes:
    """About 20 kB that inflate to 19 MB of int8 X (1.9M rows x 10) and a 1.9 MB int8 y."""
    n = 1_900_000
    return _npz(X=np.zeros((n, 10), np.int8), y=(np.arange(n) % 2).astype(np.int8))


def _csv_5mb() -> bytes:
    """About 5 MB of short numbers (2.6M values): 125,000 rows of 20 digits and a label.

    Short cells are the worst case per byte: each became a Python float in a list (32 bytes
    for 2 bytes of CSV)."""
    rng = np.random.default_rng(1)
    X = rng.integers(0, 10, size=(125_000, 20))
    y = (X.sum(axis=1) > 90).astype(int)
    lines = [",".join([f"f{i}" for i in range(20)] + ["label"])]
    lines += [",".join(map(str, row)) + f",{t}" for row, t in zip(X.tolist(), y, strict=True)]
    return "\n".join(lines).encode()


def _wide_header() -> bytes:
    """16,000 columns whose last two names repeat (the worst case of a quadratic search)."""
    names = [f"c{i}" for i in range(15_999)] + ["c15998", "label"]
    return (",".join(names) + "\n" + ",".join(["1"] * len(names)) + "\n").encode()


# (case, file name, body factory, target, expected status)
HOSTILE = [
    ("npz-int8-bomb", "bomb.npz", _int8_bomb, None, 201),
    ("csv-5mb", "big.csv", _csv_5mb, "label", 201),
    ("csv-16k-columns", "wide.csv", _wide_header, "label", 422),
]


@pytest.fixture
def fresh_server(tmp_path):
    srv = start_server(tmp_path, workers=0)
    yield srv
    stop_server(srv)


@pytest.mark.parametrize(("case", "filename", "make", "target", "status"), HOSTILE,
                         ids=[h[0] for h in HOSTILE])
def test_hostile_upload_peak_rss_and_cpu(fresh_server, measure, case, filename, make, target,
                                         status):
    raw = make()
    pid = fresh_server.proc.pid
    with fresh_server.client("mallory") as client:
        # Warm up: the first uploads import and initialise what every later one uses.
        for body, name, tgt in ((_small_csv(), "w.csv", "label"),
                                (_npz(X=np.ones((40, 2)), y=np.arange(40) % 2), "w.npz", None)):
            r = client.post("/api/v1/datasets", files={"file": (name, body)},
                            data={"target": tgt} if tgt else {})
            assert r.status_code == 201, r.text
        idle = _status_kb(pid)
        reset = _reset_peak(pid)
        cpu0 = _cpu_s(pid)
        r = client.post("/api/v1/datasets", files={"file": (filename, raw)},
                        data={"target": target} if target else {}, timeout=120)
        cpu = _cpu_s(pid) - cpu0
        peak = _status_kb(pid)["VmHWM"]
    growth_mb = (peak - idle["VmRSS"]) / 1024
    measure(f"upload_{case}", f"{case}: {len(raw) / 1e6:.2f} MB upload -> {r.status_code}, "
            f"peak RSS +{growth_mb:.0f} MB over the idle {idle['VmRSS'] / 1024:.0f} MB "
            f"(peak reset: {reset}), {cpu:.2f} CPU s")
    assert r.status_code == status, r.text[:2000]
    if status == 422:
        assert r.json()["errors"][0]["field"] == "file", r.text
    assert growth_mb < RSS_GROWTH_BOUND_MB, (
        f"{case}: peak RSS grew {growth_mb:.0f} MB (bound {RSS_GROWTH_BOUND_MB} MB)")
    if case == "csv-16k-columns":
        assert cpu < HEADER_CPU_BOUND_S, f"{cpu:.2f} CPU s on a 16k-column header"
