"""Tenants, keys, uploads, quotas and size limits against a real server process."""

import io
import math

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
]


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server without workers and with small limits, so jobs stay queued and quotas bite."""
    srv = start_server(tmp_path_factory.mktemp("limited"), workers=0, extra_env={
        "HPTUNE_MAX_ACTIVE_JOBS_PER_OWNER": "3",
        "HPTUNE_MAX_QUEUED_TRIALS_PER_OWNER": "50",
        "HPTUNE_MAX_TRIALS_PER_JOB": "100",
        "HPTUNE_MAX_EPOCHS_PER_TRIAL": "100",
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


def test_nan_literals_in_json_are_422_not_500(limited):
    client = limited.client("tab")
    for raw in (b'{"n_trials": NaN}', b'{"max_epochs": Infinity}',
                b'{"search_space": {"dropout": {"low": -Infinity, "high": 0.5}}}'):
        r = client.post("/api/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
        assert "NaN" not in r.text and "Infinity" not in r.text


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
    cases.append((buf.getvalue(), "NPZ"))
    cases.append((b"PK\x03\x04garbage", "NPZ"))
    for raw, words in cases:
        r = client.post("/api/v1/datasets", files={"file": ("d.npz", raw)})
        assert r.status_code == 422, r.text
        assert words.lower() in r.json()["errors"][0]["message"].lower()


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
