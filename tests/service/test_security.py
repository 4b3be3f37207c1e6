"""Tenants, keys, uploads, quotas and size limits against a real server process."""

import io
import math
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.conftest import hptune, start_server, stop_server

GOOD_JOB = {"name": "sec", "n_trials": 2, "max_epochs": 2, "model": {"hidden_layers": [16]}}

# (body, field named in the 422) — every one must leave no job behind.
BAD_SPECS = [
    ({**GOOD_JOB, "surprise": 1}, "surprise"),
    ({**GOOD_JOB, "n_trials": 0}, "n_trials"),
    ({**GOOD_JOB, "n_trials": 10**9}, "n_trials"),
    ({**GOOD_JOB, "max_epochs": 5000}, "max_epochs"),
    ({**GOOD_JOB, "timeout_seconds": -1}, "timeout_seconds"),
    ({**GOOD_JOB, "timeout_seconds": "Infinity"}, "timeout_seconds"),
    ({**GOOD_JOB, "dataset": "imagenet"}, "dataset"),
    ({**GOOD_JOB, "dataset": 999999}, "dataset"),
    ({**GOOD_JOB, "metric": "val_r2"}, "metric"),
    ({**GOOD_JOB, "sampler": {"name": "grid"}}, "sampler.name"),
    ({**GOOD_JOB, "pruner": {"name": "oracle"}}, "pruner.name"),
    ({**GOOD_JOB, "model": {"optimizer": "lbfgs"}}, "model.optimizer"),
    ({**GOOD_JOB, "search_space": {"learning_rate": {"low": 0.1, "high": 0.01}}},
     "search_space.learning_rate"),
    ({**GOOD_JOB, "search_space": {"learning_rate": {"low": 0, "high": 0.1, "log": True}}},
     "search_space.learning_rate"),
    ({**GOOD_JOB, "search_space": {"batch_size": {"choices": []}}}, "search_space.batch_size"),
    ({**GOOD_JOB, "search_space": {"batch_size": {"choices": [8, 8]}}},
     "search_space.batch_size"),
    ({**GOOD_JOB, "search_space": {"batch_size": {"choices": [-8]}}}, "search_space.batch_size"),
    ({**GOOD_JOB, "search_space": {"dropout": {"low": "NaN", "high": 0.5}}},
     "search_space.dropout"),
    ({**GOOD_JOB, "timeout_seconds": 10**7}, "timeout_seconds"),
    ({**GOOD_JOB, "name": "two\nlines"}, "name"),
    ({**GOOD_JOB, "name": "nul\x00byte"}, "name"),
]

# Values above the limited server's settings but within the spec's hard caps: only the
# configured bounds (job_checks.check_spec) refuse them. (field, value, configured bound)
OVER_CONFIGURED = [
    ("n_trials", 101, "100"),
    ("max_epochs", 101, "100"),
    ("timeout_seconds", 3601, "3600"),
]


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server without workers and with small limits, so jobs stay queued and quotas bite."""
    srv = start_server(tmp_path_factory.mktemp("limited"), workers=0, extra_env={
        "HPTUNE_MAX_ACTIVE_JOBS_PER_OWNER": "3",
        "HPTUNE_MAX_QUEUED_TRIALS_PER_OWNER": "50",
        "HPTUNE_MAX_TRIALS_PER_JOB": "100",
        "HPTUNE_MAX_EPOCHS_PER_TRIAL": "100",
        "HPTUNE_MAX_TIMEOUT_SECONDS": "3600",
        "HPTUNE_MAX_REQUEST_BYTES": "4096",
        "HPTUNE_MAX_UPLOAD_BYTES": "20000",
    })
    yield srv
    stop_server(srv)


def _count_jobs(client):
    return client.get("/api/v1/jobs").json()["count"]


@pytest.mark.parametrize(("body", "field"), BAD_SPECS, ids=[f for _, f in BAD_SPECS])
def test_bad_spec_is_422_naming_the_field(limited, body, field):
    client = limited.client("tab")
    before = _count_jobs(client)
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    fields = [e["field"] for e in r.json()["errors"]]
    assert any(f and f.startswith(field) for f in fields), fields
    assert _count_jobs(client) == before


@pytest.mark.parametrize(("field", "value", "bound"), OVER_CONFIGURED,
                         ids=[f for f, _, _ in OVER_CONFIGURED])
def test_spec_over_configured_bound_is_422(limited, field, value, bound):
    client = limited.client("tab")
    before = _count_jobs(client)
    r = client.post("/api/v1/jobs", json={**GOOD_JOB, field: value})
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["field"] == field and bound in err["message"], err
    assert _count_jobs(client) == before


def test_nan_literals_in_json_are_422_not_500(limited):
    client = limited.client("tab")
    before = _count_jobs(client)
    for raw, prefix, name in (
        (b'{"n_trials": NaN}', "n_trials", "n_trials"),
        (b'{"max_epochs": Infinity}', "max_epochs", "max_epochs"),
        (b'{"search_space": {"dropout": {"low": -Infinity, "high": 0.5}}}',
         "search_space.dropout", "search_space.dropout.low"),
    ):
        r = client.post("/api/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
        assert "NaN" not in r.text and "Infinity" not in r.text
        errors = r.json()["errors"]
        assert errors and all(e["field"].startswith(prefix) for e in errors), r.text
        # The error on the value names its field (a union such as `dropout: FloatRange | Fixed`
        # adds errors from its other branch: extra or missing keys).
        assert any(e["field"] == name and e["message"].startswith("Input should be")
                   for e in errors), r.text
    assert _count_jobs(client) == before


def _csv(rows):
    return "\n".join(",".join(map(str, r)) for r in rows).encode()


def _good_rows(n=60):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 3))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    return [["a", "b", "c", "label"]] + [[*map(float, x), int(t)] for x, t in zip(X, y,
                                                                                  strict=True)]


BAD_UPLOADS = [
    ("empty", b"", "label", "file", "empty"),
    ("non-numeric", _csv([["a", "label"], [1, 0], ["x1", 1]] + [[i, i % 2] for i in range(20)]),
     "label", "file", "row 3, column 'a'"),
    ("ragged", _csv([["a", "b", "label"], [1, 2, 0], [1, 1]] + [[i, i, i % 2] for i in range(20)]),
     "label", "file", "row 3"),
    ("nan", _csv([["a", "label"], [1, 0], ["nan", 1]] + [[i, i % 2] for i in range(20)]),
     "label", "file", "row 3, column 'a'"),
    ("inf", _csv([["a", "label"], [1, 0], [1, 1], ["inf", 0]] + [[i, i % 2] for i in range(20)]),
     "label", "file", "row 4"),
    ("nul", b"a,label\n1,0\n\x00,1\n", "label", "file", "NUL"),
    ("latin1", "a,label\n1,0\n\xe9,1\n".encode("latin-1"), "label", "file", "UTF-8"),
    ("no-target-col", _csv(_good_rows()), "missing", "target", "missing"),
    ("too-few-rows", _csv([["a", "label"], [1, 0], [2, 1], [3, 0]]), "label", "file", "split"),
    ("single-class", _csv([["a", "label"]] + [[i, 1] for i in range(40)]), "label", "target",
     "single class"),
]


@pytest.mark.parametrize(("case", "raw", "target", "field", "words"), BAD_UPLOADS,
                         ids=[b[0] for b in BAD_UPLOADS])
def test_bad_upload_is_422_naming_row_or_column(limited, case, raw, target, field, words):
    client = limited.client("uploader")
    before = client.get("/api/v1/datasets").json()["count"]
    r = client.post("/api/v1/datasets", files={"file": (f"{case}.csv", raw, "text/csv")},
                    data={"target": target})
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["field"] == field
    assert words.lower() in err["message"].lower(), err
    assert client.get("/api/v1/datasets").json()["count"] == before


def test_bad_npz_uploads(limited):
    client = limited.client("uploader")
    cases = []
    buf = io.BytesIO()
    np.savez(buf, X=np.ones((30, 2)))
    cases.append((buf.getvalue(), "lacks"))
    buf = io.BytesIO()
    np.savez(buf, X=np.ones((30, 2)), y=np.array([math.nan] + [0, 1] * 14 + [1]))
    cases.append((buf.getvalue(), "NaN"))
    buf = io.BytesIO()
    np.savez(buf, X=np.array([{"a": 1}] * 30, dtype=object), y=np.zeros(30))
    cases.append((buf.getvalue(), "dtype object"))
    cases.append((b"PK\x03\x04garbage", "NPZ"))
    for raw, words in cases:
        r = client.post("/api/v1/datasets", files={"file": ("d.npz", raw)})
        assert r.status_code == 422, r.text
        assert words.lower() in r.json()["errors"][0]["message"].lower()


def _npz_claiming(shape):
    """An NPZ whose X header claims `shape` of float64 but holds 64 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    y = io.BytesIO()
    np.save(y, np.zeros(30))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("X.npy", header.getvalue() + bytes(64))
        zf.writestr("y.npy", y.getvalue())
    return buf.getvalue()


def _npz_bomb():
    """A few kB that inflate to 8 MB of zeros."""
    buf = io.BytesIO()
    np.savez_compressed(buf, X=np.zeros((20_000, 50)), y=np.zeros(20_000))
    return buf.getvalue()


@pytest.mark.parametrize(("raw", "words"), [
    (_npz_claiming((10**6, 10**6)), "array X has shape [1000000, 1000000]"),
    (_npz_bomb(), "array X unpacks to 8000128 bytes"),
], ids=["huge-header", "inflates"])
def test_npz_too_large_unpacked_is_413_before_unpacking(limited, raw, words):
    client = limited.client("uploader")
    before = client.get("/api/v1/datasets").json()["count"]
    assert len(raw) < 20_000  # the upload itself is far under the limit
    r = client.post("/api/v1/datasets", files={"file": ("d.npz", raw)})
    assert r.status_code == 413, r.text
    err = r.json()["errors"][0]
    assert err["field"] == "file" and words in err["message"], err
    assert client.get("/api/v1/datasets").json()["count"] == before


def test_oversized_upload_is_413_and_json_body_limit(limited):
    client = limited.client("uploader")
    big = b"a,label\n" + b"1,0\n" * 10_000  # 40 kB > 20 kB limit
    r = client.post("/api/v1/datasets", files={"file": ("big.csv", big)},
                    data={"target": "label"})
    assert r.status_code == 413
    # A body without Content-Length (chunked) is cut off at the limit too.
    def chunks():
        for _ in range(100):
            yield b" " * 1000
    r = client.post("/api/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = client.post("/api/v1/jobs", json={**GOOD_JOB, "name": "x" * 5000})
    assert r.status_code == 413


def test_quota_is_429_with_retry_after(limited):
    client = limited.client("greedy")
    for _ in range(3):
        assert client.post("/api/v1/jobs", json=GOOD_JOB).status_code == 201
    r = client.post("/api/v1/jobs", json=GOOD_JOB)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    # Another owner is not affected; queued trials count too.
    other = limited.client("modest")
    assert other.post("/api/v1/jobs", json={**GOOD_JOB, "n_trials": 40}).status_code == 201
    r = other.post("/api/v1/jobs", json={**GOOD_JOB, "n_trials": 20})
    assert r.status_code == 429
    # Cancelling frees the quota.
    job_id = client.get("/api/v1/jobs").json()["data"][0]["id"]
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    assert client.post("/api/v1/jobs", json=GOOD_JOB).status_code == 201


def test_revoked_key_is_401_and_keys_stay_out_of_logs(limited):
    key = hptune("keys", "create", "--owner", "temp", env=limited.env).stdout.strip()
    assert key.startswith("hpt_") and "\n" not in key
    h = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{limited.url}/api/v1/jobs", headers=h).status_code == 200
    listing = hptune("keys", "list", env=limited.env).stdout
    assert key not in listing and "temp" in listing
    key_id = next(line.split()[0] for line in listing.splitlines() if "\ttemp\t" in line)
    hptune("keys", "revoke", key_id, env=limited.env)
    r = httpx.get(f"{limited.url}/api/v1/jobs", headers=h)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    for k in [key, *limited.keys.values()]:
        assert k not in limited.log_path.read_text()


def test_tenant_isolation_on_every_endpoint(server):
    alice, bob = server.client("alice"), server.client("bob")
    rows = _good_rows()
    ds = alice.post("/api/v1/datasets", files={"file": ("a.csv", _csv(rows))},
                    data={"target": "label", "name": "alice-data"})
    assert ds.status_code == 201, ds.text
    ds_id = ds.json()["id"]
    job = alice.post("/api/v1/jobs", json={**GOOD_JOB, "dataset": ds_id}).json()
    job_id = job["id"]
    done = server.wait_job(alice, job_id)
    assert done["status"] == "succeeded" and done["finished"] == 2
    snapshot = alice.get(f"/api/v1/jobs/{job_id}/trials").json()

    for method, path in [
        ("GET", f"/api/v1/jobs/{job_id}"),
        ("GET", f"/api/v1/jobs/{job_id}/trials"),
        ("GET", f"/api/v1/jobs/{job_id}/report"),
        ("GET", f"/api/v1/jobs/{job_id}/report?format=html"),
        ("GET", f"/api/v1/jobs/{job_id}/report?format=csv"),
        ("GET", f"/api/v1/jobs/{job_id}/plots/history"),
        ("GET", f"/api/v1/jobs/{job_id}/events"),
        ("POST", f"/api/v1/jobs/{job_id}/cancel"),
        ("DELETE", f"/api/v1/jobs/{job_id}"),
        ("GET", f"/api/v1/datasets/{ds_id}"),
    ]:
        r = bob.request(method, path)
        assert r.status_code == 404, (method, path, r.status_code)
        # The same answer as for an id that does not exist: no existence leak.
        missing = bob.request(method, path.replace(f"/{job_id}", "/999999")
                              .replace(f"/{ds_id}", "/999999"))
        assert missing.status_code == 404 and missing.json()["detail"].split()[0] == \
            r.json()["detail"].split()[0]
    assert ds_id not in [d["id"] for d in bob.get("/api/v1/datasets").json()["data"]]
    assert job_id not in [j["id"] for j in bob.get("/api/v1/jobs").json()["data"]]
    r = bob.post("/api/v1/jobs", json={**GOOD_JOB, "dataset": ds_id})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "dataset"
    assert alice.get(f"/api/v1/jobs/{job_id}/trials").json() == snapshot
    assert alice.get(f"/api/v1/jobs/{job_id}").json()["status"] == "succeeded"


def _multipart(filename: str, content: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart body written by hand: httpx would percent-escape control characters."""
    boundary = "hptune-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{filename}"\r\nContent-Type: text/csv\r\n\r\n'.encode()
                 + content + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_nul_in_names_is_422_on_postgres(postgres_backend, cluster_factory):
    """PostgreSQL text cannot hold NUL: refused at validation, not a driver error (503)."""
    cluster = cluster_factory(postgres_backend.url)
    cluster.start_api()
    client = cluster.client()
    good = _csv(_good_rows())
    cases = [
        ("POST", "/api/v1/jobs", {"json": {**GOOD_JOB, "name": "bad\x00name"}}, "name"),
        ("POST", "/api/v1/datasets", {"files": {"file": ("d.csv", good)},
                                      "data": {"target": "label", "name": "bad\x00name"}},
         "name"),
    ]
    body, content_type = _multipart("bad\x00name.csv", good, {"target": "label"})
    cases.append(("POST", "/api/v1/datasets",
                  {"content": body, "headers": {"Content-Type": content_type}}, "file"))
    for method, path, kwargs, field in cases:
        r = client.request(method, path, **kwargs)
        assert r.status_code == 422, (path, field, r.text)
        err = r.json()["errors"][0]
        assert err["field"] == field and "U+0000" in err["message"], err
    assert client.get("/api/v1/jobs").json()["count"] == 0
    assert client.get("/api/v1/datasets").json()["count"] == 0
    # The hand-written multipart body is well formed: with a clean name it is stored.
    body, content_type = _multipart("fine.csv", good, {"target": "label"})
    r = client.post("/api/v1/datasets", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text


def test_active_job_quota_holds_under_concurrent_submissions(backend, cluster_factory):
    """Two API processes on one database, 24 simultaneous submissions by one owner against an
    active-jobs quota of 4: exactly 4 jobs are created and every other answer is a 429."""
    quota, per_api = 4, 12
    apis = [cluster_factory(backend.url, HPTUNE_MAX_ACTIVE_JOBS_PER_OWNER=str(quota))
            for _ in range(2)]
    for api in apis:
        api.start_api()
    clients = [api.client() for api in apis]
    start = threading.Barrier(len(apis) * per_api)

    def submit(client: httpx.Client) -> httpx.Response:
        start.wait()
        return client.post("/api/v1/jobs", json=GOOD_JOB)

    with ThreadPoolExecutor(len(apis) * per_api) as pool:
        answers = list(pool.map(submit, [c for c in clients for _ in range(per_api)]))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] * quota + [429] * (len(answers) - quota), \
        [r.text for r in answers if r.status_code not in (201, 429)]
    assert all(int(r.headers["retry-after"]) > 0 for r in answers if r.status_code == 429)
    assert clients[0].get("/api/v1/jobs").json()["count"] == quota
