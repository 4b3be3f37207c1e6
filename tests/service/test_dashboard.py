"""optuna-dashboard behind the login: sessions, per-owner scope, read-only, `hptune dashboard`.

Most tests drive the API app in process over a real database, SQLite and PostgreSQL (jobs are
queued, not run: a job's study exists from its submission); `hptune dashboard` runs as a real
process.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import httpx
import optuna
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.spawn import free_port, tls_context
from tests.conftest import ROOT, create_key, start_server, stop_server

JOB = {"name": "dash", "dataset": "digits", "n_trials": 3, "max_epochs": 2,
       "model": {"hidden_layers": [8]}}
TTL_S = 3600


@dataclass
class World:
    """An API app on a fresh database with two owners' jobs and an admin."""

    app: object
    db: object
    url: str
    keys: dict[str, str]
    studies: dict[str, int]  # owner -> the study id of their job
    jobs: dict[str, int]  # owner -> job id

    def client(self, https: bool = False) -> TestClient:
        return TestClient(self.app, base_url="https://testserver" if https else
                          "http://testserver", follow_redirects=False)

    def bearer(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def login(self, who: str, https: bool = False) -> TestClient:
        client = self.client(https)
        r = client.post("/dashboard/login", data={"key": self.keys[who]})
        assert r.status_code == 303, r.text
        return client


@pytest.fixture(scope="module")
def world(module_backend) -> World:
    """On SQLite and on PostgreSQL: the scope's and the sessions' SQL must hold on both."""
    from service.api import create_app
    from service.keys import create_key as make_key
    from service.migrate import upgrade
    from service.scheduler import open_database
    from service.settings import Settings

    url = module_backend.url
    settings = Settings(database_url=url, dashboard_session_seconds=TTL_S)
    db = open_database(settings)
    upgrade(db)
    keys = {}
    with db.session() as s:
        for owner, admin in (("alice", False), ("bob", False), ("root", True)):
            keys[owner] = make_key(s, owner, admin)[1]
    app = create_app(settings, db)
    client = TestClient(app)
    jobs, studies = {}, {}
    for owner in ("alice", "bob"):
        r = client.post("/api/v1/jobs", json=JOB,
                        headers={"Authorization": f"Bearer {keys[owner]}"})
        assert r.status_code == 201, r.text
        jobs[owner] = r.json()["id"]
        studies[owner] = optuna.load_study(study_name=f"job-{jobs[owner]}", storage=url)._study_id
    yield World(app, db, url, keys, studies, jobs)
    db.dispose()


def _study_names(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {s["study_name"] for s in response.json()["study_summaries"]}


def _cookie_attrs(header: str) -> tuple[str, str, dict[str, str]]:
    """(name, value, {attribute lowercased: value}) of one Set-Cookie header."""
    first, *attrs = [p.strip() for p in header.split(";")]
    name, _, value = first.partition("=")
    return name, value, {a.partition("=")[0].lower(): a.partition("=")[2] for a in attrs}


def test_no_credentials_is_401_for_data_and_a_login_redirect_for_pages(world):
    client = world.client()
    for path in ("/api/studies", f"/api/studies/{world.studies['alice']}",
                 f"/csv/{world.studies['alice']}", "/api/meta", "/static/bundle.js"):
        r = client.get(path)
        assert r.status_code == 401, (path, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer" and "login" in r.json()["detail"]
    r = client.get("/dashboard")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    r = client.get(f"/dashboard/studies/{world.studies['alice']}")
    assert r.status_code == 303
    assert r.headers["location"] == (
        f"/dashboard/login?next=/dashboard/studies/{world.studies['alice']}")
    # The login page is a form that POSTs the key, carrying `next` along.
    page = client.get(r.headers["location"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert re.search(r'<form method="post" action="/dashboard/login">', page.text)
    assert f'value="/dashboard/studies/{world.studies["alice"]}"' in page.text
    assert page.headers["cache-control"] == "no-store"
    # An unknown bearer key is no better than none.
    r = client.get("/api/studies", headers={"Authorization": "Bearer hpt_nope"})
    assert r.status_code == 401


def test_a_key_in_the_url_never_logs_in(world):
    client = world.client()
    for who in ("alice", "root"):
        r = client.get("/dashboard/login", params={"key": world.keys[who],
                                                   "next": "/dashboard/x"})
        assert r.status_code == 400 and "set-cookie" not in r.headers, r.headers
        assert "location" not in r.headers and "POST" in r.json()["detail"]
        assert client.get("/api/studies").status_code == 401
    # A POST with the key in its query string, not its form, logs in neither.
    r = client.post(f"/dashboard/login?key={world.keys['root']}",
                    data={"next": "/dashboard/x"})
    assert r.status_code == 400 and "set-cookie" not in r.headers
    # The old cookie, which held the raw key, opens nothing any more (and a login clears it).
    client.cookies.set("hptune_dashboard_key", world.keys["root"])
    assert client.get("/api/studies").status_code == 401
    r = client.post("/dashboard/login", data={"key": world.keys["alice"]})
    assert any(h.startswith("hptune_dashboard_key=;") and "Max-Age=0" in h
               for h in r.headers.get_list("set-cookie")), r.headers


def test_login_sets_a_hashed_http_only_session_cookie(world):
    client = world.client()
    page = f"/dashboard/studies/{world.studies['alice']}"
    r = client.post("/dashboard/login", data={"key": world.keys["alice"], "next": page})
    assert r.status_code == 303 and r.headers["location"] == page
    (header,) = [h for h in r.headers.get_list("set-cookie") if h.startswith("hptune_session=")]
    name, value, attrs = _cookie_attrs(header)
    assert name == "hptune_session" and len(value) >= 40
    assert "httponly" in attrs and attrs["samesite"] == "Lax" and attrs["path"] == "/"
    assert attrs["max-age"] == str(TTL_S)
    assert "secure" not in attrs  # plain http: a Secure cookie would never come back
    assert world.keys["alice"] not in header and world.keys["alice"] not in value
    # The database holds the session's hash, the key's id and owner, never the id itself.
    with world.db.session() as s:
        rows = s.execute(text("SELECT * FROM hptune_dashboard_sessions")).mappings().all()
    mine = [row for row in rows if row["id_hash"] == hashlib.sha256(value.encode()).hexdigest()]
    assert len(mine) == 1 and mine[0]["owner"] == "alice" and not mine[0]["is_admin"]
    assert all(value not in str(dict(row)) for row in rows)
    assert _study_names(client.get("/api/studies")) == {f"job-{world.jobs['alice']}"}
    # Signed in, the login page says as whom and offers to sign out.
    page = client.get("/dashboard/login")
    assert "Signed in as <b>alice</b>" in page.text and 'action="/dashboard/logout"' in page.text


@pytest.mark.parametrize(("nxt", "target"), [
    ("/dashboard/studies/1", "/dashboard/studies/1"),
    ("//evil.example/x", "/dashboard"),
    ("https://evil.example", "/dashboard"),
    ("/dashboard/..//evil.example", "/dashboard"),
    ("/dashboard/\\evil", "/dashboard"),
    ("/api/v1/jobs", "/dashboard"),
    ("", "/dashboard"),
])
def test_login_goes_on_to_a_local_dashboard_page_only(world, nxt, target):
    r = world.client().post("/dashboard/login", data={"key": world.keys["bob"], "next": nxt})
    assert r.status_code == 303 and r.headers["location"] == target, (nxt, r.headers)


def test_bad_logins(world):
    client = world.client()
    r = client.post("/dashboard/login", data={"key": "hpt_nope"})
    assert r.status_code == 401 and "set-cookie" not in r.headers and "location" not in r.headers
    assert "unknown or revoked" in r.text
    r = client.post("/dashboard/login", json={"key": world.keys["alice"]})
    assert r.status_code == 415 and "set-cookie" not in r.headers
    r = client.post("/dashboard/login", data={"key": "x" * 20_000})
    assert r.status_code == 413
    assert client.put("/dashboard/login", data={"key": world.keys["alice"]}).status_code == 405
    assert client.get("/dashboard/logout").status_code == 405


def test_https_cookie_is_secure(world):
    client = world.client(https=True)
    r = client.post("/dashboard/login", data={"key": world.keys["bob"]})
    assert r.status_code == 303
    name, _value, attrs = _cookie_attrs(r.headers["set-cookie"])
    assert name == "hptune_session" and "secure" in attrs and "httponly" in attrs
    assert _study_names(client.get("/api/studies")) == {f"job-{world.jobs['bob']}"}
    r = client.post("/dashboard/logout")
    assert "secure" in _cookie_attrs(r.headers["set-cookie"])[2]


def test_logout_ends_the_session(world):
    client = world.login("alice")
    session_id = client.cookies["hptune_session"]
    assert client.get("/api/studies").status_code == 200
    r = client.post("/dashboard/logout")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    name, value, attrs = _cookie_attrs(r.headers["set-cookie"])
    assert name == "hptune_session" and value == "" and attrs["max-age"] == "0"
    # The old cookie, replayed, is dead on the server side too.
    replay = world.client()
    replay.cookies.set("hptune_session", session_id)
    assert replay.get("/api/studies").status_code == 401
    assert replay.get("/dashboard").status_code == 303
    digest = hashlib.sha256(session_id.encode()).hexdigest()
    with world.db.session() as s:
        assert s.execute(text("SELECT count(*) FROM hptune_dashboard_sessions "
                              "WHERE id_hash = :h"), {"h": digest}).scalar() == 0


def test_a_revoked_key_ends_its_sessions(world):
    from service.keys import create_key as make_key
    from service.keys import revoke_key

    with world.db.session() as s:
        row, key = make_key(s, "alice")
        key_id = row.id
    client = world.client()
    assert client.post("/dashboard/login", data={"key": key}).status_code == 303
    assert _study_names(client.get("/api/studies")) == {f"job-{world.jobs['alice']}"}
    with world.db.session() as s:
        revoke_key(s, key_id)
    assert client.get("/api/studies").status_code == 401
    assert client.get("/dashboard").status_code == 303
    assert world.client().get("/api/studies", headers={"Authorization": f"Bearer {key}"}
                              ).status_code == 401
    assert world.client().post("/dashboard/login", data={"key": key}).status_code == 401


def test_an_expired_session_is_over(world):
    client = world.login("bob")
    digest = hashlib.sha256(client.cookies["hptune_session"].encode()).hexdigest()
    from service.models import DashboardSession, utcnow

    with world.db.session() as s:
        s.get(DashboardSession, digest).expires_at = utcnow() - timedelta(seconds=1)
    assert client.get("/api/studies").status_code == 401


def test_an_owner_sees_only_their_own_studies(world):
    mine, theirs = world.studies["alice"], world.studies["bob"]
    for client in (world.login("alice"),
                   TestClient(world.app, headers=world.bearer("alice"), follow_redirects=False)):
        assert _study_names(client.get("/api/studies")) == {f"job-{world.jobs['alice']}"}
        for path in (f"/api/studies/{theirs}", f"/api/studies/{theirs}/param_importances",
                     f"/api/studies/{theirs}/plot/history", f"/csv/{theirs}",
                     f"/dashboard/studies/{theirs}", f"/dashboard/studies/{theirs}/analytics",
                     "/api/studies/999999", "/csv/999999", "/csv/99999999999999999999",
                     "/api/studies/-1"):
            r = client.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text[:200])
            assert f"job-{world.jobs['bob']}" not in r.text
        r = client.get(f"/api/studies/{mine}")
        assert r.status_code == 200 and r.json()["name"] == f"job-{world.jobs['alice']}"
        r = client.get(f"/csv/{mine}")
        assert r.status_code == 200 and r.text.startswith("Number,State")
        assert client.get(f"/dashboard/studies/{mine}").status_code == 200
        assert client.get("/api/meta").status_code == 200


def test_an_admin_sees_every_study(world):
    expected = {f"job-{world.jobs['alice']}", f"job-{world.jobs['bob']}"}
    for client in (world.login("root"),
                   TestClient(world.app, headers=world.bearer("root"), follow_redirects=False)):
        assert expected <= _study_names(client.get("/api/studies"))
        for owner in ("alice", "bob"):
            r = client.get(f"/api/studies/{world.studies[owner]}")
            assert r.status_code == 200 and r.json()["name"] == f"job-{world.jobs[owner]}"
            assert client.get(f"/csv/{world.studies[owner]}").status_code == 200
        for path in ("/api/studies/999999", "/csv/99999999999999999999", "/api/studies/0"):
            assert client.get(path).status_code == 404, path


def _write_requests(study_id: int, trial_id: int) -> list[tuple[str, str, dict | None]]:
    """Every writing route of optuna-dashboard (see its _app.py, artifact/ and llm/ modules)."""
    return [
        ("POST", "/api/studies", {"study_name": "new", "directions": ["minimize"]}),
        ("POST", f"/api/studies/{study_id}/rename", {"study_name": "renamed"}),
        ("DELETE", f"/api/studies/{study_id}", {}),
        ("PUT", f"/api/studies/{study_id}/note", {"version": 1, "body": "hacked"}),
        ("POST", f"/api/studies/{study_id}/preference", {"mode": "ChooseWorst",
                                                         "candidates": [], "clicked": 0}),
        ("PUT", f"/api/studies/{study_id}/preference_feedback_component",
         {"output_type": "note"}),
        ("POST", f"/api/studies/{study_id}/preference/abc", None),
        ("DELETE", f"/api/studies/{study_id}/preference/abc", None),
        ("POST", f"/api/trials/{trial_id}/tell", {"state": "Fail"}),
        ("POST", f"/api/trials/{trial_id}/user-attrs", {"user_attrs": {"owner": "mallory"}}),
        ("POST", f"/api/studies/{study_id}/{trial_id}/skip", None),
        ("PUT", f"/api/studies/{study_id}/{trial_id}/note", {"version": 1, "body": "hacked"}),
        ("POST", f"/api/artifacts/{study_id}/{trial_id}", {"file": "data:text/plain;base64,eA=="}),
        ("POST", f"/api/artifacts/{study_id}", {"file": "data:text/plain;base64,eA=="}),
        ("DELETE", f"/api/artifacts/{study_id}/{trial_id}/0a", None),
        ("DELETE", f"/api/artifacts/{study_id}/0a", None),
        ("POST", "/api/llm/trial_filter_query", {"user_query": "x"}),
        ("PATCH", f"/api/studies/{study_id}", {}),
        ("OPTIONS", f"/api/studies/{study_id}", None),
        ("POST", "/dashboard", None),
        ("DELETE", "/dashboard/studies/1", None),
    ]


def _snapshot(url: str, name: str) -> tuple:
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    return (study._study_id, study.user_attrs,
            study._storage.get_study_system_attrs(study._study_id),
            [(t.number, t.state, t.user_attrs, t.system_attrs) for t in trials])


@pytest.mark.parametrize("who", ["alice", "root"])
@pytest.mark.parametrize("how", ["session", "bearer"])
def test_every_write_is_refused_and_the_study_stays(world, who, how):
    name = f"job-{world.jobs['alice']}"
    study = optuna.load_study(study_name=name, storage=world.url)
    trials = study.get_trials(deepcopy=False)
    trial_id = trials[0]._trial_id if trials else 1
    before = _snapshot(world.url, name)
    n_studies = len(optuna.get_all_study_names(world.url))
    client = (world.login(who) if how == "session" else
              TestClient(world.app, headers=world.bearer(who), follow_redirects=False))
    for method, path, body in _write_requests(study._study_id, trial_id):
        r = client.request(method, path, json=body)
        assert r.status_code in (403, 405), (method, path, r.status_code, r.text[:200])
        if r.status_code == 405:
            assert "POST" not in r.headers["allow"] and "GET" in r.headers["allow"]
    assert _snapshot(world.url, name) == before
    assert len(optuna.get_all_study_names(world.url)) == n_studies
    assert _study_names(client.get("/api/studies")) >= {name}


def test_the_storage_behind_the_dashboard_is_scoped_and_read_only(world):
    from optuna.storages import BaseStorage

    from service.dashboard_storage import (
        WRITE_METHODS,
        ReadOnlyStorageError,
        ScopedReadOnlyStorage,
    )

    base = world.db.storage
    alice = ScopedReadOnlyStorage(base, world.db, "alice")
    admin = ScopedReadOnlyStorage(base, world.db, None)
    mine, theirs = world.studies["alice"], world.studies["bob"]
    assert [s._study_id for s in alice.get_all_studies()] == [mine]
    assert {mine, theirs} <= {s._study_id for s in admin.get_all_studies()}
    assert alice.get_study_name_from_id(mine) == f"job-{world.jobs['alice']}"
    their_trials = base.get_all_trials(theirs)
    for call in (lambda: alice.get_study_name_from_id(theirs),
                 lambda: alice.get_all_trials(theirs),
                 lambda: alice.get_study_user_attrs(theirs),
                 lambda: alice.get_study_system_attrs(theirs),
                 lambda: alice.get_study_directions(theirs),
                 lambda: alice.get_best_trial(theirs),
                 lambda: alice.get_n_trials(theirs),
                 lambda: alice.get_study_id_from_name(f"job-{world.jobs['bob']}"),
                 *([lambda: alice.get_trial(their_trials[0]._trial_id)] if their_trials else [])):
        with pytest.raises(KeyError):
            call()
    assert admin.get_study_name_from_id(theirs) == f"job-{world.jobs['bob']}"
    # Every writing method of Optuna's storage interface is listed, and each one refuses.
    writers = {n for n in dir(BaseStorage) if n.startswith(("set_", "create_", "delete_"))}
    assert writers <= set(WRITE_METHODS), writers - set(WRITE_METHODS)
    for storage in (alice, admin):
        for method in WRITE_METHODS:
            required = [p for p in inspect.signature(getattr(BaseStorage, method)).parameters
                        .values() if p.default is p.empty and p.name != "self"]
            with pytest.raises(ReadOnlyStorageError):
                getattr(storage, method)(*[mine] * len(required))
    assert base.get_study_name_from_id(mine) == f"job-{world.jobs['alice']}"


def test_scoped_apps_are_bounded_and_need_a_viewer(world):
    from service.dashboard import ScopedDashboards

    apps = ScopedDashboards(world.db, max_apps=2)
    a, b = apps.app_for("alice"), apps.app_for("bob")
    assert apps.app_for("alice") is a
    apps.app_for(None)  # the admins' view pushes out the least recently used: bob's
    assert apps.app_for("alice") is a and apps.app_for("bob") is not b
    # A request that reaches the WSGI side without the gate's viewer is refused.
    seen = []
    body = apps({"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies"},
                lambda status, headers: seen.append(status))
    assert seen == ["403 Forbidden"] and b"viewer" in b"".join(body)


# `hptune dashboard` as a real process on the API's database.

def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("standalone")
    api = start_server(tmp, workers=0)
    keys = {"alice": create_key(api.env, "alice"), "bob": create_key(api.env, "bob"),
            "root": create_key(api.env, "root", admin=True)}
    jobs = {}
    for owner in ("alice", "bob"):
        r = httpx.post(f"{api.url}/api/v1/jobs", json=JOB, timeout=30,
                       headers={"Authorization": f"Bearer {keys[owner]}"})
        assert r.status_code == 201, r.text
        jobs[owner] = r.json()["id"]
    port = free_port()
    log_path = tmp / "dashboard.log"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "service", "dashboard", "--port",
                                 str(port)], env=api.env, cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            httpx.get(f"{url}/dashboard", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
    studies = {o: optuna.load_study(study_name=f"job-{j}",
                                    storage=api.env["HPTUNE_DATABASE_URL"])._study_id
               for o, j in jobs.items()}
    yield url, keys, jobs, studies, api
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    stop_server(api)


def test_hptune_dashboard_is_gated(standalone):
    url, keys, jobs, studies, api = standalone
    assert httpx.get(f"{url}/api/studies").status_code == 401
    assert httpx.get(f"{url}/dashboard").status_code == 303
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}  # the compose health check
    assert httpx.get(f"{url}/api/v1/jobs").status_code == 404  # the dashboard, nothing else
    for headers in ({}, {"Authorization": f"Bearer {keys['root']}"}):
        r = httpx.delete(f"{url}/api/studies/{studies['bob']}", headers=headers)
        assert r.status_code in (401, 403, 405), r.status_code
        r = httpx.post(f"{url}/api/studies/{studies['bob']}/rename", headers=headers,
                       json={"study_name": "mine-now"})
        assert r.status_code in (401, 403, 405), r.status_code
    assert f"job-{jobs['bob']}" in optuna.get_all_study_names(api.env["HPTUNE_DATABASE_URL"])
    alice = {"Authorization": f"Bearer {keys['alice']}"}
    assert _study_names(httpx.get(f"{url}/api/studies", headers=alice)) == {
        f"job-{jobs['alice']}"}
    assert httpx.get(f"{url}/api/studies/{studies['bob']}", headers=alice).status_code == 404
    assert httpx.get(f"{url}/csv/{studies['bob']}", headers=alice).status_code == 404
    # A browser's login works there too.
    with httpx.Client(base_url=url) as browser:
        r = browser.post("/dashboard/login", data={"key": keys["bob"]})
        assert r.status_code == 303 and "hptune_session" in browser.cookies
        assert _study_names(browser.get("/api/studies")) == {f"job-{jobs['bob']}"}
    # It listens on loopback unless --host says otherwise.
    from typer.main import get_command

    from service.cli import app

    params = {p.name: p for p in get_command(app).commands["dashboard"].params}
    assert params["host"].default == "127.0.0.1"
    addr = _non_loopback_address()
    if addr is not None:
        with pytest.raises(OSError), socket.create_connection(
                (addr, int(url.rsplit(":", 1)[1])), timeout=2):
            pass


def test_hptune_dashboard_keeps_owners_apart_under_concurrent_requests(standalone):
    url, keys, jobs, _studies, _api = standalone
    expected = {"alice": {f"job-{jobs['alice']}"}, "bob": {f"job-{jobs['bob']}"},
                "root": {f"job-{jobs['alice']}", f"job-{jobs['bob']}"}}

    def look(who: str) -> tuple[str, set[str]]:
        r = httpx.get(f"{url}/api/studies", headers={"Authorization": f"Bearer {keys[who]}"},
                      timeout=30, verify=tls_context())
        return who, _study_names(r)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(look, ["alice", "bob", "root"] * 20))
    for who, names in results:
        assert names == expected[who] if who != "root" else names >= expected[who], (who, names)
