"""Dataset uploads against a real server process: memory and CPU of hostile uploads, per-owner
dataset quotas, and DELETE /api/v1/datasets/{id}.

The memory cases each start a fresh `hptune serve --workers 0` and read the process's peak
resident set (VmHWM in /proc/<pid>/status) around one upload, so that one case's high-water
mark or retained heap cannot hide another's.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.spawn import tls_context
from tests.conftest import create_key, start_server, stop_server

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
@pytest.mark.serial  # peak RSS and CPU seconds of the server process
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


# ------------------------------------------------------------------- quotas and DELETE

QUOTA_COUNT = 4
QUOTA_BYTES = 15_000


@pytest.fixture(scope="module")
def quota_server(tmp_path_factory):
    """No workers (jobs stay queued) and small dataset quotas."""
    srv = start_server(tmp_path_factory.mktemp("quota"), workers=0, extra_env={
        "HPTUNE_MAX_DATASETS_PER_OWNER": str(QUOTA_COUNT),
        "HPTUNE_MAX_DATASET_BYTES_PER_OWNER": str(QUOTA_BYTES),
    })
    yield srv
    stop_server(srv)


def _upload(client: httpx.Client, body: bytes, name: str = "d.csv") -> httpx.Response:
    return client.post("/api/v1/datasets", files={"file": (name, body)},
                       data={"target": "label"})


def _random_csv(n: int, seed: int) -> bytes:
    """n rows of 3 random features: about 20 bytes a row once stored (floats hardly compress)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return _csv([["a", "b", "c", "label"]] + [[*x, i % 2] for i, x in enumerate(X.tolist())])


def _count(client: httpx.Client) -> int:
    return client.get("/api/v1/datasets").json()["count"]


def test_dataset_count_quota_is_429(quota_server):
    client = quota_server.client("counter")
    for i in range(QUOTA_COUNT):
        r = _upload(client, _small_csv(seed=i))
        assert r.status_code == 201, r.text
    r = _upload(client, _small_csv(seed=99))
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) > 0
    err = r.json()["errors"][0]
    assert err["field"] == "file"
    assert f"quota {QUOTA_COUNT}" in err["message"] and "HPTUNE_MAX_DATASETS_PER_OWNER" in \
        err["message"], err
    assert _count(client) == QUOTA_COUNT
    # Another owner's room is their own.
    assert _upload(quota_server.client("bystander"), _small_csv()).status_code == 201
    # Deleting one gives its place back.
    first = client.get("/api/v1/datasets").json()["data"][0]["id"]
    assert client.delete(f"/api/v1/datasets/{first}").status_code == 204
    assert _upload(client, _small_csv(seed=99)).status_code == 201


def test_dataset_byte_quota_is_429_on_stored_size(quota_server):
    client = quota_server.client("hoarder")
    sizes = []
    for seed in range(QUOTA_COUNT):
        r = _upload(client, _random_csv(300, seed))
        if r.status_code != 201:
            break
        sizes.append(r.json()["size_bytes"])
    assert r.status_code == 429, r.text
    assert 1 <= len(sizes) < QUOTA_COUNT  # the bytes bit before the count
    assert sum(sizes) <= QUOTA_BYTES < sum(sizes) + max(sizes)
    err = r.json()["errors"][0]
    assert err["field"] == "file"
    assert f"quota of {QUOTA_BYTES} bytes" in err["message"], err
    assert f"take {sum(sizes)} bytes" in err["message"], err
    assert _count(client) == len(sizes)
    # A small one still fits in what is left.
    assert _upload(client, _random_csv(20, 7)).status_code == 201


def test_count_quota_holds_across_api_processes(quota_server, tmp_path):
    """Two API processes on one database, eight concurrent uploads: exactly the quota lands."""
    second = start_server(tmp_path, database_url=quota_server.env["HPTUNE_DATABASE_URL"],
                          workers=0, extra_env={
                              "HPTUNE_MAX_DATASETS_PER_OWNER": str(QUOTA_COUNT),
                              "HPTUNE_MAX_DATASET_BYTES_PER_OWNER": str(QUOTA_BYTES)})
    try:
        key = quota_server.client("racer").headers["Authorization"]
        urls = [quota_server.url, second.url] * 4

        def upload(i: int) -> int:
            with httpx.Client(base_url=urls[i], timeout=60, verify=tls_context(),
                              headers={"Authorization": key}) as c:
                return _upload(c, _small_csv(seed=i)).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = sorted(pool.map(upload, range(8)))
    finally:
        stop_server(second)
    assert codes == [201] * QUOTA_COUNT + [429] * (8 - QUOTA_COUNT), codes
    assert _count(quota_server.client("racer")) == QUOTA_COUNT


def test_delete_dataset_is_owner_scoped(quota_server):
    alice, bob = quota_server.client("del-alice"), quota_server.client("del-bob")
    r = _upload(alice, _small_csv())
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    r = bob.delete(f"/api/v1/datasets/{ds}")
    assert r.status_code == 404, r.text
    assert alice.get(f"/api/v1/datasets/{ds}").status_code == 200
    assert alice.delete(f"/api/v1/datasets/{ds}").status_code == 204
    assert alice.get(f"/api/v1/datasets/{ds}").status_code == 404
    assert ds not in [d["id"] for d in alice.get("/api/v1/datasets").json()["data"]]
    assert alice.delete(f"/api/v1/datasets/{ds}").status_code == 404
    # An admin may delete anyone's.
    ds = _upload(bob, _small_csv()).json()["id"]
    admin_key = create_key(quota_server.env, "del-root", admin=True)
    with httpx.Client(base_url=quota_server.url, timeout=30,
                      headers={"Authorization": f"Bearer {admin_key}"}) as admin:
        assert admin.delete(f"/api/v1/datasets/{ds}").status_code == 204
    assert bob.get(f"/api/v1/datasets/{ds}").status_code == 404


def test_delete_dataset_in_use_is_409_then_jobs_cannot_name_it(quota_server):
    client = quota_server.client("del-user")
    ds = _upload(client, _small_csv()).json()["id"]
    job = client.post("/api/v1/jobs", json={**GOOD_JOB, "dataset": ds})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert job.json()["status"] == "queued"  # no workers: it stays queued
    r = client.delete(f"/api/v1/datasets/{ds}")
    assert r.status_code == 409, r.text
    assert f"job(s) {job_id}" in r.json()["detail"], r.text
    assert client.get(f"/api/v1/datasets/{ds}").status_code == 200
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert client.delete(f"/api/v1/datasets/{ds}").status_code == 204
    r = client.post("/api/v1/jobs", json={**GOOD_JOB, "dataset": ds})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "dataset"
