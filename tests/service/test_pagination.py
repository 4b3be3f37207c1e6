"""Cursor pages of the lists (`?after=&limit=`, a `next` link): every item once and in order,
the last page's `next` null, hostile cursors and sizes refused, and owners kept apart. In
process on a real SQLite file."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from service.client import Client
from service.worker import Worker
from tests.conftest import in_process_app, key_headers

TINY = {"n_trials": 1, "max_epochs": 1, "model": {"hidden_layers": [4]}}
CSV = ("a,b,label\n" + "\n".join(f"{i % 7}.0,{i % 3}.5,{i % 2}" for i in range(40))).encode()


@pytest.fixture
def app_db(tmp_path):
    with in_process_app(tmp_path / "pages.db",
                        max_queued_trials_per_owner=100, max_active_jobs_per_owner=50) as pair:
        yield pair


def _walk(client: TestClient, path: str, headers: dict[str, str] | None = None
          ) -> tuple[list[list[dict]], list[dict]]:
    """Every page of a list by its `next` links: (the pages' items, every page's body)."""
    pages, bodies = [], []
    while path is not None:
        r = client.get(path, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        bodies.append(body)
        pages.append(body["data"])
        path = body["next"]
        assert len(bodies) < 100, "next links loop"
    return pages, bodies


def _submit(client: TestClient, headers: dict[str, str] | None = None, **spec) -> int:
    r = client.post("/api/v1/jobs", json={**TINY, **spec}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_jobs_pages_newest_first_each_once(app_db):
    client, _ = app_db
    ids = [_submit(client, name=f"j{i}") for i in range(7)]
    theirs = _submit(client, key_headers(client, "bob"), name="bob's")
    pages, bodies = _walk(client, "/api/v1/jobs?limit=3")
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [j["id"] for p in pages for j in p] == sorted(ids, reverse=True)
    assert all(b["count"] == 7 for b in bodies)
    assert bodies[0]["next"] == f"/api/v1/jobs?after={sorted(ids)[-3]}&limit=3"
    assert bodies[-1]["next"] is None
    # Every response field is still there.
    assert {"id", "name", "owner", "status", "counts", "finished", "spec"} <= set(pages[0][0])
    # Another owner's pages never hold alice's jobs; an admin's hold everyone's.
    bob_pages, _ = _walk(client, "/api/v1/jobs?limit=1", key_headers(client, "bob"))
    assert [j["id"] for p in bob_pages for j in p] == [theirs]
    admin_pages, _ = _walk(client, "/api/v1/jobs?limit=2", key_headers(client, "admin"))
    assert [j["id"] for p in admin_pages for j in p] == sorted([*ids, theirs], reverse=True)
    # One page holding everything has no next; the old offset still skips.
    whole = client.get("/api/v1/jobs").json()
    assert whole["next"] is None and len(whole["data"]) == 7
    skipped = client.get("/api/v1/jobs?offset=5").json()
    assert [j["id"] for j in skipped["data"]] == sorted(ids, reverse=True)[5:]


def test_datasets_pages_in_id_order_each_once(app_db):
    client, _ = app_db
    ids = []
    for i in range(5):
        r = client.post("/api/v1/datasets", files={"file": (f"d{i}.csv", CSV)},
                        data={"target": "label", "name": f"d{i}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = client.post("/api/v1/datasets", files={"file": ("b.csv", CSV)},
                    data={"target": "label"}, headers=key_headers(client, "bob"))
    assert r.status_code == 201, r.text
    theirs = r.json()["id"]
    pages, bodies = _walk(client, "/api/v1/datasets?limit=2")
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [d["id"] for p in pages for d in p] == ids
    assert all(b["count"] == 5 for b in bodies) and bodies[-1]["next"] is None
    bob_pages, _ = _walk(client, "/api/v1/datasets?limit=1", key_headers(client, "bob"))
    assert [d["id"] for p in bob_pages for d in p] == [theirs]
    whole = client.get("/api/v1/datasets").json()
    assert whole["next"] is None and [d["id"] for d in whole["data"]] == ids


def test_trials_pages_by_number_each_once(app_db):
    client, db = app_db
    job_id = _submit(client, n_trials=5)
    Worker(db, "pages-worker").run(max_trials=5)
    whole = client.get(f"/api/v1/jobs/{job_id}/trials").json()
    assert whole["count"] == 5 and whole["next"] is None
    assert [t["number"] for t in whole["data"]] == list(range(5))
    pages, bodies = _walk(client, f"/api/v1/jobs/{job_id}/trials?limit=2")
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [t for p in pages for t in p] == whole["data"]
    assert bodies[0]["next"] == f"/api/v1/jobs/{job_id}/trials?after=1&limit=2"
    assert all(b["count"] == 5 for b in bodies) and bodies[-1]["next"] is None
    # The pages are the trials Optuna's own whole-study read shows.
    from search import trials_to_dicts
    from service import jobs
    whole_study = jobs.study_trials(db, jobs.get_job(db, "alice", job_id))
    assert trials_to_dicts(whole_study) == whole["data"]
    # An exact fit ends with next null, and past the end is an empty last page.
    exact = client.get(f"/api/v1/jobs/{job_id}/trials?limit=5").json()
    assert len(exact["data"]) == 5 and exact["next"] is None
    past = client.get(f"/api/v1/jobs/{job_id}/trials?after=4").json()
    assert past == {"data": [], "count": 5, "next": None}
    # Another owner cannot page alice's trials.
    r = client.get(f"/api/v1/jobs/{job_id}/trials?limit=1", headers=key_headers(client, "bob"))
    assert r.status_code == 404


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/datasets",
                                  "/api/v1/jobs/1/trials"])
@pytest.mark.parametrize(("field", "value"), [
    ("limit", "0"), ("limit", str(10**9)), ("limit", "-1"), ("limit", "x"),
    ("after", "-1"), ("after", "abc"), ("after", str(2**63)), ("after", "1.5"),
])
def test_hostile_cursors_and_sizes_are_refused_naming_the_field(app_db, path, field, value):
    client, _ = app_db
    _submit(client)
    r = client.get(f"{path}?{field}={value}")
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [f"query.{field}"], r.text


def test_the_client_follows_next_to_the_end(app_db):
    client, db = app_db
    ids = [_submit(client, name=f"c{i}") for i in range(4)]
    Worker(db, "client-worker").run(max_trials=4)
    api = Client("http://testserver", None)
    api.http = client  # the TestClient is an httpx.Client with alice's key
    pages = list(api.pages("/api/v1/jobs", limit=3))
    assert [len(p["data"]) for p in pages] == [3, 1]
    jobs_ = api.jobs()
    assert [j["id"] for j in jobs_["data"]] == sorted(ids, reverse=True)
    assert jobs_["count"] == 4
    trials = api.trials(ids[0])
    assert trials["count"] == 1 and [t["number"] for t in trials["data"]] == [0]
