"""Per-trial compute and memory bounds at submission, and the default timeout, on a real server."""

import io

import numpy as np
import pytest

from search import JobSpec
from search.memory import bundled_shape, largest_trial_memory, megabytes
from tests.conftest import start_server, stop_server

LIMIT = 256 << 20  # HPTUNE_MAX_TRIAL_BYTES of the server below
DEFAULT_TIMEOUT = 5000
JOB = {"name": "limits", "n_trials": 2, "max_epochs": 2, "model": {"hidden_layers": [16]}}
LAYERS = {"n_layers": {"low": 1, "high": 8}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """No workers (jobs stay queued), a small per-trial memory limit, a default timeout."""
    server = start_server(tmp_path_factory.mktemp("limits"), workers=0, extra_env={
        "HPTUNE_MAX_TRIAL_BYTES": str(LIMIT),
        "HPTUNE_DEFAULT_TIMEOUT_SECONDS": str(DEFAULT_TIMEOUT),
    })
    yield server
    stop_server(server)


def _refused(client, body, field):
    before = client.get("/api/v1/jobs").json()["count"]
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any(e["field"] and e["field"].startswith(field) for e in errors), errors
    assert client.get("/api/v1/jobs").json()["count"] == before
    return next(e for e in errors if e["field"].startswith(field))


HOSTILE = [
    ({**JOB, "search_space": {**LAYERS, "layer_width": {"choices": [10**9]}}},
     "search_space.layer_width"),
    ({**JOB, "search_space": {"batch_size": {"choices": list(range(1, 50_001))}}},
     "search_space.batch_size"),
    ({**JOB, "search_space": {"batch_size": {"value": 10**6}}}, "search_space.batch_size"),
    ({**JOB, "pruner": {"name": "successive_halving", "resource": "examples",
                        "report_every": 1}}, "pruner.report_every"),
    ({**JOB, "name": "report\u202efdp.exe"}, "name"),
    ({**JOB, "name": "zero\u200bwidth"}, "name"),
]


@pytest.mark.parametrize(("body", "field"), HOSTILE, ids=[f for _, f in HOSTILE])
def test_hostile_spec_is_422_naming_the_field(srv, body, field):
    _refused(srv.client("hostile"), body, field)


OVER_BUDGET = [
    # 8 x 4096 with Adam: ~3 GB of parameters, gradients, moments and the best copy.
    ({**JOB, "model": {"hidden_layers": [4096] * 8}}, "digits", "model.hidden_layers"),
    ({**JOB, "search_space": {**LAYERS, "layer_width": {"choices": [64, 2048]}}}, "digits",
     "search_space.layer_width"),
    # One 4096-wide layer is small; 3400-row batches of it are not.
    ({**JOB, "dataset": "mnist1d", "model": {"hidden_layers": [4096]},
      "search_space": {"batch_size": {"choices": [32, 4096]}}}, "mnist1d",
     "search_space.batch_size"),
]


@pytest.mark.parametrize(("body", "dataset", "field"), OVER_BUDGET,
                         ids=[f for _, _, f in OVER_BUDGET])
def test_over_budget_model_is_422_with_estimate_and_limit(srv, body, dataset, field):
    err = _refused(srv.client("budget"), body, field)
    estimate = largest_trial_memory(JobSpec.model_validate(body), *bundled_shape(dataset))
    assert estimate.total > LIMIT
    assert megabytes(estimate.total) in err["message"], err
    assert megabytes(LIMIT) in err["message"] and "HPTUNE_MAX_TRIAL_BYTES" in err["message"]
    # The same job with the narrow defaults fits.
    narrow = {k: v for k, v in body.items() if k not in ("model", "search_space")}
    assert srv.client("budget").post("/api/v1/jobs", json=narrow).status_code == 201


def test_uploaded_datasets_are_budgeted_by_their_shape(srv):
    # A wide upload (20 rows x 30,000 features): the default 128-64 network fits in the
    # limit, a 1024-wide first layer (31M weights) does not.
    client = srv.client("wide")
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, X=rng.standard_normal((20, 30_000), dtype=np.float32),
             y=np.arange(20) % 2)
    r = client.post("/api/v1/datasets", files={"file": ("wide.npz", buf.getvalue())})
    assert r.status_code == 201, r.text
    dataset = r.json()["id"]
    ok = client.post("/api/v1/jobs", json={"name": "wide-ok", "dataset": dataset})
    assert ok.status_code == 201, ok.text
    err = _refused(client, {"name": "wide", "dataset": dataset,
                            "model": {"hidden_layers": [1024]}}, "model.hidden_layers")
    assert "30000 features" in err["message"] and megabytes(LIMIT) in err["message"]


def test_default_timeout_is_stored_in_the_spec(srv):
    client = srv.client("timeouts")
    job = client.post("/api/v1/jobs", json=JOB).json()
    assert job["spec"]["timeout_seconds"] == DEFAULT_TIMEOUT
    assert client.get(f"/api/v1/jobs/{job['id']}").json()["spec"]["timeout_seconds"] == (
        DEFAULT_TIMEOUT)
    own = client.post("/api/v1/jobs", json={**JOB, "timeout_seconds": 60}).json()
    assert own["spec"]["timeout_seconds"] == 60
