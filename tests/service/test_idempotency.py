"""Idempotency-Key on POST /api/v1/jobs and /api/v1/datasets, against real servers.

A retried submission answers the first one (same status, same body) and makes nothing new;
keys are per owner, bounded, expire, hold across API processes on one database (SQLite and
PostgreSQL), and survive the death of the process that held one. `hptune submit` sends a
fresh key per submission and retries a lost answer with it: a loopback proxy that swallows
the first answer shows that exactly one job results.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from service import idempotency
from service.client import Client, RetryPolicy
from service.db import Database
from service.errors import InvalidSpec
from service.models import IdempotencyKey
from service.settings import Settings
from service.spawn import free_port, tls_context
from tests.conftest import Server, hptune, start_server, stop_server
from tests.service.conftest import TINY_JOB

# Small enough that a key moved a little into the past has expired.
RETENTION_S = 300
SERVER_ENV = {"HPTUNE_IDEMPOTENCY_SECONDS": str(RETENTION_S),
              "HPTUNE_MAX_ACTIVE_JOBS_PER_OWNER": "100"}
KEY_HEADER = "Idempotency-Key"


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Server:
    """One API process without workers (jobs stay queued: nothing trains)."""
    s = start_server(tmp_path_factory.mktemp("idempotency"), workers=0, extra_env=SERVER_ENV)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def db(srv) -> Database:
    """The server's database, opened by the test to look at and age keys directly."""
    handle = Database(Settings(database_url=srv.env["HPTUNE_DATABASE_URL"],
                               idempotency_seconds=RETENTION_S), role="test")
    yield handle
    handle.dispose()


def _job(name: str = "idem") -> dict:
    return {**TINY_JOB, "name": name}


def _post_job(c: httpx.Client, key: str | bytes | None, spec: dict | None = None
              ) -> httpx.Response:
    headers = {KEY_HEADER: key} if key is not None else {}
    return c.post("/api/v1/jobs", json=spec or _job(), headers=headers)


def _jobs(c: httpx.Client) -> list[int]:
    body = c.get("/api/v1/jobs").json()
    assert body["count"] == len(body["data"])
    return [j["id"] for j in body["data"]]


def _csv(seed: int = 0, n: int = 60) -> bytes:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    rows = [["a", "b", "c", "label"]] + [[*map(float, x), int(t)]
                                         for x, t in zip(X, y, strict=True)]
    return "\n".join(",".join(map(str, r)) for r in rows).encode()


def _upload(c: httpx.Client, key: str | None, body: bytes, target: str = "label",
            name: str | None = None) -> httpx.Response:
    headers = {KEY_HEADER: key} if key is not None else {}
    data = {"target": target, **({"name": name} if name else {})}
    return c.post("/api/v1/datasets", files={"file": ("d.csv", body)}, data=data,
                  headers=headers)


def _datasets(c: httpx.Client) -> list[int]:
    return [d["id"] for d in c.get("/api/v1/datasets").json()["data"]]


def _names_the_header(r: httpx.Response) -> None:
    body = r.json()
    assert KEY_HEADER in body["detail"], body
    assert [e["field"] for e in body["errors"]] == [KEY_HEADER], body


# --- jobs ---------------------------------------------------------------------------------


def test_same_key_twice_answers_the_first_job(srv):
    c = srv.client("idem-twice")
    key = str(uuid.uuid4())
    first = _post_job(c, key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    again = _post_job(c, key)
    assert again.status_code == 201, again.text
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert _jobs(c) == [first.json()["id"]]
    # The same job spelt differently (key order, a default written out) is the same request;
    # the draft's quoted form of the key is the same key.
    reordered = dict(reversed(list({**_job(), "seed": 0}.items())))
    r = c.post("/api/v1/jobs", json=reordered, headers={KEY_HEADER: f'"{key}"'})
    assert r.status_code == 201 and r.json()["id"] == first.json()["id"], r.text
    # Without a key, every POST is a new job, as before.
    assert _post_job(c, None).status_code == 201
    assert len(_jobs(c)) == 2


def test_same_key_with_another_request_is_422(srv):
    c = srv.client("idem-other")
    key = str(uuid.uuid4())
    job_id = _post_job(c, key).json()["id"]
    r = _post_job(c, key, _job("another-name"))
    assert r.status_code == 422, r.text
    assert "different request" in r.json()["detail"]
    _names_the_header(r)
    # The same key on the other endpoint is another request too.
    r = _upload(c, key, _csv())
    assert r.status_code == 422 and "different request" in r.json()["detail"], r.text
    assert _jobs(c) == [job_id] and _datasets(c) == []
    # The first request's answer still stands.
    assert _post_job(c, key).json()["id"] == job_id


def test_keys_are_per_owner(srv):
    alice, bob = srv.client("idem-alice"), srv.client("idem-bob")
    key = str(uuid.uuid4())
    a, b = _post_job(alice, key), _post_job(bob, key)
    assert a.status_code == b.status_code == 201, (a.text, b.text)
    assert a.json()["id"] != b.json()["id"]
    assert "idempotent-replayed" not in b.headers
    assert _jobs(alice) == [a.json()["id"]] and _jobs(bob) == [b.json()["id"]]


HOSTILE_KEYS = [
    ("empty", ""),
    ("10-kB", "k" * 10_000),
    ("256-chars", "k" * 256),
    ("escape-sequence", "\x1b[31mred"),
    ("delete-char", "a\x7fb"),
    ("tab-inside", "a\tb"),
    ("bell", "ring\x07"),
    ("latin-1-byte", b"caf\xe9"),
    ("utf-8-bytes", "caf\u00e9".encode()),
    ("lone-quote", '"'),
    ("empty-quoted", '""'),
    ("unterminated-quote", '"abc'),
    ("bad-escape", '"a\\nb"'),
]


@pytest.mark.parametrize(("case", "key"), HOSTILE_KEYS, ids=[c for c, _ in HOSTILE_KEYS])
def test_hostile_keys_are_422_naming_the_header(srv, case, key):
    c = srv.client("idem-hostile")
    before = _jobs(c)
    r = _post_job(c, key)
    assert r.status_code == 422, (case, r.status_code, r.text)
    _names_the_header(r)
    r = _upload(c, key, _csv())
    assert r.status_code == 422, (case, r.status_code, r.text)
    _names_the_header(r)
    assert _jobs(c) == before and _datasets(c) == []


def test_longest_key_and_spaces_inside_are_accepted(srv):
    c = srv.client("idem-bounds")
    for key in ("k" * idempotency.KEY_MAX_CHARS, "order 66 / batch #7"):
        first = _post_job(c, key)
        assert first.status_code == 201, first.text
        assert _post_job(c, key).json()["id"] == first.json()["id"]
    assert len(_jobs(c)) == 2


def test_the_header_is_in_the_openapi(srv):
    spec = httpx.get(f"{srv.url}/openapi.json").json()
    for path in ("/api/v1/jobs", "/api/v1/datasets"):
        params = spec["paths"][path]["post"]["parameters"]
        [param] = [p for p in params if p["name"] == KEY_HEADER]
        assert param["in"] == "header" and param["required"] is False
        assert param["schema"]["type"] == "string"
        assert param["schema"]["maxLength"] == idempotency.KEY_MAX_CHARS
        assert "422" in param["description"] and "409" in param["description"]


# --- uploads ------------------------------------------------------------------------------


def test_uploads_are_idempotent_too(srv):
    c = srv.client("idem-uploads")
    key = str(uuid.uuid4())
    first = _upload(c, key, _csv(), name="train")
    assert first.status_code == 201, first.text
    again = _upload(c, key, _csv(), name="train")
    assert again.status_code == 201 and again.json() == first.json(), again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert _datasets(c) == [first.json()["id"]]
    # Other bytes, another target or another name under the same key: another request.
    for body, target, name in ((_csv(seed=1), "label", "train"), (_csv(), "a", "train"),
                               (_csv(), "label", "other")):
        r = _upload(c, key, body, target, name)
        assert r.status_code == 422 and "different request" in r.json()["detail"], r.text
    assert _datasets(c) == [first.json()["id"]]


def test_a_failed_request_gives_its_key_back(srv, db):
    c = srv.client("idem-failed")
    key = str(uuid.uuid4())
    # Refused by the upload's checks (no such target column): nothing stored, no key kept...
    r = _upload(c, key, _csv(), target="missing")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "target", r.text
    with db.session() as s:
        assert s.scalar(select(IdempotencyKey).where(IdempotencyKey.key == key)) is None
    # ...so the corrected request may reuse the key (the draft's "fix and retry").
    r = _upload(c, key, _csv(), target="missing")
    assert r.status_code == 422, r.text
    assert _datasets(c) == []


# --- expiry -------------------------------------------------------------------------------


def _age(db: Database, owner: str, key: str, seconds: float, column: str = "created_at"
         ) -> None:
    """Move a key's `column` `seconds` into the past, straight in the database."""
    with db.session() as s:
        row = s.scalar(select(IdempotencyKey).where(IdempotencyKey.owner == owner,
                                                    IdempotencyKey.key == key))
        assert row is not None, f"no key {key} of {owner}"
        setattr(row, column, getattr(row, column) - timedelta(seconds=seconds))


def test_an_expired_key_is_a_new_key(srv, db):
    owner = "idem-expiry"
    c = srv.client(owner)
    key = str(uuid.uuid4())
    first = _post_job(c, key).json()["id"]
    _age(db, owner, key, RETENTION_S - 30)
    assert _post_job(c, key).json()["id"] == first  # still within the window
    _age(db, owner, key, 60)
    r = _post_job(c, key)
    assert r.status_code == 201 and "idempotent-replayed" not in r.headers, r.text
    second = r.json()["id"]
    assert second != first and sorted(_jobs(c)) == sorted([first, second])
    # The new answer is the key's from now on; the expired row is gone.
    assert _post_job(c, key).json()["id"] == second
    with db.session() as s:
        rows = list(s.scalars(select(IdempotencyKey).where(IdempotencyKey.owner == owner)))
    assert [(r.key, r.resource_id, r.status) for r in rows] == [(key, second, "done")]


def test_expired_keys_of_every_owner_are_purged(srv, db):
    keys = {}
    for owner in ("idem-purge-a", "idem-purge-b"):
        c = srv.client(owner)
        keys[owner] = [str(uuid.uuid4()), str(uuid.uuid4())]
        for k in keys[owner]:
            assert _post_job(c, k).status_code == 201
    _age(db, "idem-purge-a", keys["idem-purge-a"][0], RETENTION_S + 1)
    _age(db, "idem-purge-b", keys["idem-purge-b"][0], 10 * RETENTION_S, "expires_at")
    assert idempotency.purge_expired(db) == 2
    with db.session() as s:
        left = set(s.scalars(select(IdempotencyKey.key).where(
            IdempotencyKey.owner.in_(list(keys)))))
    assert left == {keys["idem-purge-a"][1], keys["idem-purge-b"][1]}


def test_retention_setting_is_bounded():
    for bad in (0, -1, 31 * 24 * 3600, "a day", 2**63):
        with pytest.raises(ValidationError, match="idempotency_seconds"):
            Settings(idempotency_seconds=bad)
    assert Settings().idempotency_seconds == 24 * 3600


# --- concurrency: one key, two API processes, one database ------------------------------


def test_fifty_concurrent_posts_across_two_processes_make_one_job(backend, tmp_path, measure):
    env = {**SERVER_ENV, "HPTUNE_POOL_SIZE": "5", "HPTUNE_MAX_OVERFLOW": "10"}
    first = start_server(tmp_path, database_url=backend.url, workers=0, extra_env=env)
    second = None
    try:
        second = start_server(tmp_path, database_url=backend.url, workers=0, extra_env=env)
        auth = first.client("racer").headers["Authorization"]
        urls = [first.url, second.url]
        key, spec = str(uuid.uuid4()), _job("race")
        go = threading.Barrier(50)

        def post(i: int) -> httpx.Response:
            with httpx.Client(base_url=urls[i % 2], timeout=120, verify=tls_context(),
                              headers={"Authorization": auth}) as c:
                go.wait(timeout=60)
                return _post_job(c, key, spec)

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(post, range(50)))
        codes = sorted(r.status_code for r in answers)
        measure("idempotency_race", f"{backend.name}: 50 concurrent POSTs, one key, two API "
                f"processes: {codes.count(201)} x 201, {codes.count(409)} x 409")
        assert set(codes) <= {201, 409}, [(r.status_code, r.text) for r in answers]
        created = [r for r in answers if r.status_code == 201]
        assert created, codes
        assert len({r.json()["id"] for r in created}) == 1
        assert sum("idempotent-replayed" not in r.headers for r in created) == 1
        for r in answers:
            if r.status_code == 409:
                assert "in progress" in r.json()["detail"] and r.headers["retry-after"] == "1"
        job_id = created[0].json()["id"]
        for url in urls:
            with httpx.Client(base_url=url, timeout=30, headers={"Authorization": auth}) as c:
                assert _jobs(c) == [job_id]
                # Once the first has finished, every retry gets its answer.
                r = _post_job(c, key, spec)
                assert r.status_code == 201 and r.json()["id"] == job_id, r.text
    finally:
        for s in (first, second):
            if s is not None:
                stop_server(s)


# --- a holder that dies --------------------------------------------------------------------


@pytest.mark.parametrize("step", ["before_row", "after_row"])
def test_a_key_held_by_a_dead_process_is_taken_over(srv, db, tmp_path, step):
    """The API process dies inside the first POST: before its job's row committed (no job),
    or after (a job, and the key knows it). The key answers 409 while its lease runs, then
    the next retry takes it over and ends with exactly one job."""
    if "test_crash_in_create" not in Settings.model_fields:
        pytest.skip("needs the HPTUNE_TEST_CRASH_IN_CREATE fault injection")
    owner = f"idem-dies-{step}"
    c = srv.client(owner)
    crasher = start_server(tmp_path, database_url=srv.env["HPTUNE_DATABASE_URL"], workers=0,
                           extra_env={**SERVER_ENV, "HPTUNE_TEST_CRASH_IN_CREATE": step})
    try:
        key = str(uuid.uuid4())
        with (httpx.Client(base_url=crasher.url, timeout=60, headers=c.headers) as dying,
              pytest.raises(httpx.TransportError)):
            _post_job(dying, key)
        assert crasher.proc.wait(timeout=60) == 1
    finally:
        stop_server(crasher)
    jobs_left = _jobs(c)
    assert len(jobs_left) == (1 if step == "after_row" else 0)
    r = _post_job(c, key)
    assert r.status_code == 409 and "in progress" in r.json()["detail"], r.text
    _age(db, owner, key, idempotency.LEASE_S + 1, "locked_at")
    r = _post_job(c, key)
    assert r.status_code == 201, r.text
    assert _jobs(c) == [r.json()["id"]]
    if step == "after_row":
        assert r.json()["id"] == jobs_left[0]
        assert r.headers["idempotent-replayed"] == "true"
    assert _post_job(c, key).json()["id"] == r.json()["id"]


# --- the CLI retries a lost answer with the same key -------------------------------------


class DroppingProxy:
    """A loopback HTTP/1.1 proxy to a real server. It forwards every request (one per
    connection, `Connection: close` upstream); on the first `POST drop_path` it waits for the
    server's whole answer and then closes the client's connection without replying, as a
    connection lost on the way back would."""

    def __init__(self, upstream: str, drop_path: str) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.drop_path = drop_path
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.dropped = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True, name="proxy").start()

    def close(self) -> None:
        self._sock.close()

    def posts(self, path: str) -> list[dict[str, str]]:
        with self._lock:
            return [h for m, p, h in self.requests if m == "POST" and p == path]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            head, body = _read_request(conn)
            if head is None:
                return
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = dict(line.split(":", 1) for line in lines if line)
            headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
            assert "transfer-encoding" not in headers, "the proxy reads Content-Length only"
            kept = [line for line in lines if line and
                    not line.lower().startswith(("connection:", "keep-alive:"))]
            forwarded = "\r\n".join([request_line, *kept, "Connection: close", "", ""])
            with socket.create_connection(self.upstream, timeout=60) as up:
                up.sendall(forwarded.encode("latin-1") + body)
                answer = b""
                while chunk := up.recv(65536):
                    answer += chunk
            with self._lock:
                self.requests.append((method, path, headers))
                drop = method == "POST" and path == self.drop_path and self.dropped == 0
                self.dropped += drop
            if not drop:
                conn.sendall(answer)


def _read_request(conn: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body


def test_cli_submit_retries_a_lost_answer_with_the_same_key(srv, tmp_path):
    c = srv.client("idem-cli")
    proxy = DroppingProxy(srv.url, "/api/v1/jobs")
    try:
        spec = tmp_path / "job.json"
        spec.write_text(json.dumps(_job("cli-retry")))
        env = {**srv.env, "HPTUNE_URL": proxy.url, "HPTUNE_API_KEY": srv.keys["idem-cli"]}
        out = hptune("submit", str(spec), env=env, timeout=120)
    finally:
        proxy.close()
    assert proxy.dropped == 1
    posts = proxy.posts("/api/v1/jobs")
    assert len(posts) == 2, posts
    keys = {h["idempotency-key"] for h in posts}
    assert len(keys) == 1 and uuid.UUID(keys.pop()).version == 4
    assert "same Idempotency-Key" in out.stderr, out.stderr
    [job_id] = _jobs(c)
    assert f"submitted job {job_id} (cli-retry)" in out.stdout, out.stdout
    # Each submission has a key of its own: the same file submitted again is a second job.
    again = hptune("submit", str(spec), env={**env, "HPTUNE_URL": srv.url}, timeout=120)
    assert "submitted job" in again.stdout and len(_jobs(c)) == 2


def test_client_upload_retries_a_lost_answer_with_the_same_key(srv, tmp_path):
    c = srv.client("idem-client-upload")
    path = tmp_path / "train.csv"
    path.write_bytes(_csv())
    proxy = DroppingProxy(srv.url, "/api/v1/datasets")
    notes: list[str] = []
    try:
        client = Client(proxy.url, srv.keys["idem-client-upload"])
        ds = client.upload_dataset(path, target="label", on_retry=notes.append,
                                   policy=RetryPolicy(attempts=3, base_s=0.1))
    finally:
        proxy.close()
    posts = proxy.posts("/api/v1/datasets")
    assert len(posts) == 2 and len({h["idempotency-key"] for h in posts}) == 1
    assert len(notes) == 1 and "attempt 2 of 3" in notes[0]
    assert _datasets(c) == [ds["id"]] and ds["filename"] == "train.csv"


def test_client_gives_up_after_its_attempts(tmp_path):
    """Nothing listens: every attempt fails to connect, and the last error is raised."""
    port = free_port()
    notes: list[str] = []
    client = Client(f"http://127.0.0.1:{port}", "hpt_x")
    with pytest.raises(httpx.ConnectError):
        client.submit(_job(), on_retry=notes.append, policy=RetryPolicy(attempts=3, base_s=0))
    assert len(notes) == 2


# --- pure parts ---------------------------------------------------------------------------


def test_parse_key():
    assert idempotency.parse_key(None) is None
    assert idempotency.parse_key("8e03978e-40d5-43e8-bc93-6894a57f9324") == \
        "8e03978e-40d5-43e8-bc93-6894a57f9324"
    assert idempotency.parse_key('"abc"') == "abc"
    assert idempotency.parse_key('"a\\"b\\\\c"') == 'a"b\\c'
    assert idempotency.parse_key("a b") == "a b"
    for bad in ("", " a", "a ", "\x00", "x" * 256, "é", '"', '""', '"a', '"a\\x"'):
        with pytest.raises(InvalidSpec) as info:
            idempotency.parse_key(bad)
        assert info.value.field == KEY_HEADER


def test_fingerprints_separate_their_parts():
    fp = idempotency.dataset_fingerprint
    assert fp(b"ab", "c", None, None) != fp(b"a", "bc", None, None)
    assert fp(b"a", "f", None, None) != fp(b"a", "f", "", None)
    assert fp(b"a", "f", "t", None) != fp(b"a", "f", None, "t")
    assert fp(b"a", "f", "t", "n") == fp(b"a", "f", "t", "n")


def test_retry_policy_is_validated_and_bounded():
    for bad in ({"attempts": 0}, {"base_s": -1}, {"base_s": 5, "cap_s": 1}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    p = RetryPolicy(attempts=5, base_s=0.5, cap_s=2)
    assert all(0.25 <= p.delay_s(0) <= 0.5 for _ in range(20))
    assert all(p.delay_s(10) <= 2 for _ in range(20))
    assert p.delay_s(0, retry_after_s=3600) == 2 and p.delay_s(0, retry_after_s=-5) == 0
