"""Hostile HTTP against a real `hptune serve`: bodies that lie about their length, stall or
come without a key, event streams held open by the hundred, revoked keys, /metrics.

Each test waits on a response or a closed connection with a bounded socket timeout, never on
a fixed sleep.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import create_key, create_key_in_process, hptune, start_server, stop_server

REQUEST_LIMIT = 4096
IDLE_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """No workers (jobs stay queued, so their event streams stay open), small limits."""
    s = start_server(tmp_path_factory.mktemp("hostile"), workers=0, extra_env={
        "HPTUNE_MAX_REQUEST_BYTES": str(REQUEST_LIMIT),
        "HPTUNE_BODY_IDLE_TIMEOUT_SECONDS": str(IDLE_TIMEOUT_S),
        "HPTUNE_MAX_STREAMS_PER_OWNER": "2",
    })
    yield s
    stop_server(s)


def _connect(srv) -> socket.socket:
    url = urlparse(srv.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=20)
    return sock


def _status_of(sock: socket.socket) -> tuple[int, bytes]:
    """The status code and raw bytes of the response on `sock` (read until it closes or the
    headers and a short body have come)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data.split()[1]), data


def _head(path: str, *lines: str) -> bytes:
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *lines]) + "\r\n\r\n"
            ).encode()


def test_false_content_length_with_a_chunked_body_is_refused(srv):
    key = create_key(srv.env, "liar")
    with _connect(srv) as sock:
        sock.sendall(_head("/api/v1/jobs", f"Authorization: Bearer {key}",
                           "Content-Type: application/json", "Content-Length: 10",
                           "Transfer-Encoding: chunked"))
        # A body far over the limit; the server must not read it in full.
        chunk = b"x" * 65536
        sent = 0
        try:
            for _ in range(64):
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed: what should happen
        status, raw = _status_of(sock)
    assert status in (400, 413), raw[:300]


def test_chunked_body_over_the_limit_is_cut_off(srv):
    key = create_key(srv.env, "chunky")
    body = b'{"name": "' + b"a" * (REQUEST_LIMIT * 4) + b'"}'

    def chunks():
        for i in range(0, len(body), 1024):
            yield body[i:i + 1024]

    r = httpx.post(f"{srv.url}/api/v1/jobs", content=chunks(), timeout=20,
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert str(REQUEST_LIMIT) in r.json()["detail"]


def test_unauthenticated_upload_is_refused_before_its_body(srv):
    """Without a key the answer is 401 at once: the server neither waits for nor spools the
    body (an endless chunked upload with no key used to be read until the size limit)."""
    with _connect(srv) as sock:
        sock.sendall(_head("/api/v1/datasets", "Content-Type: multipart/form-data; boundary=b",
                           "Transfer-Encoding: chunked"))
        sock.sendall(b"10\r\n--b\r\nContent-Dis\r\n")  # then nothing: the body never ends
        status, raw = _status_of(sock)
    assert status == 401, raw[:300]


def test_malformed_json_without_a_key_is_401_not_422(srv):
    r = httpx.post(f"{srv.url}/api/v1/jobs", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 401, r.text
    r = httpx.post(f"{srv.url}/api/v1/jobs", content=b"{not json",
                   headers={"Content-Type": "application/json",
                            "Authorization": "Bearer hpt_not-a-key"})
    assert r.status_code == 401, r.text


def test_a_stalled_body_times_out_with_408(srv):
    key = create_key(srv.env, "staller")
    with _connect(srv) as sock:
        sock.sendall(_head("/api/v1/jobs", f"Authorization: Bearer {key}",
                           "Content-Type: application/json", "Content-Length: 100"))
        sock.sendall(b'{"name": ')  # and then nothing
        status, raw = _status_of(sock)
    assert status == 408, raw[:300]


def _open_stream(srv, key: str, job_id: int) -> httpx.Response:
    client = httpx.Client(base_url=srv.url, timeout=httpx.Timeout(30, read=60),
                          headers={"Authorization": f"Bearer {key}"})
    resp = client.send(client.build_request("GET", f"/api/v1/jobs/{job_id}/events"), stream=True)
    resp.extensions["hptune_client"] = client
    return resp


def _close(resp: httpx.Response) -> None:
    resp.close()
    resp.extensions["hptune_client"].close()


def _queued_job(srv, owner: str) -> tuple[str, int]:
    key = create_key_in_process(srv.env["HPTUNE_DATABASE_URL"], owner)
    r = httpx.post(f"{srv.url}/api/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                   json={"name": "watched", "n_trials": 2, "max_epochs": 2})
    assert r.status_code == 201, r.text
    return key, r.json()["id"]


def _median_latency(srv, key: str, n: int = 15) -> float:
    times = []
    with httpx.Client(base_url=srv.url, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(n):
            t = time.perf_counter()
            assert client.get("/api/v1/jobs").status_code == 200
            times.append(time.perf_counter() - t)
    return statistics.median(times)


@pytest.mark.serial  # a ratio of two latencies: load beside one of them would skew it
def test_open_streams_do_not_starve_the_routes(srv, measure):
    """60 open event streams (more than the 40 threads every sync route shares) leave the API
    answering about as fast as with none: a stream holds a thread only while it reads the
    database. (A synchronous stream sleeping in its thread made each request queue for one.)"""
    owners = [_queued_job(srv, f"watcher-{i}") for i in range(30)]
    quiet = _median_latency(srv, owners[0][0])
    streams = []
    try:
        for key, job_id in owners:
            for _ in range(2):
                resp = _open_stream(srv, key, job_id)
                assert resp.status_code == 200
                streams.append(resp)
        # Every stream has really started: its first event arrived.
        for resp in streams:
            assert next(resp.iter_lines()).startswith("event: ")
        busy = _median_latency(srv, owners[0][0])
        assert httpx.get(f"{srv.url}/healthz", timeout=60).status_code == 200
    finally:
        for resp in streams:
            _close(resp)
    measure("streams_latency_ratio", f"median GET /api/v1/jobs with 60 streams open / none: "
            f"{busy / quiet:.1f}x ({busy * 1000:.0f} ms / {quiet * 1000:.0f} ms)")
    assert busy / quiet < 20, (busy, quiet)


def test_streams_per_owner_are_bounded(srv):
    key, job_id = _queued_job(srv, "greedy")
    first = [_open_stream(srv, key, job_id) for _ in range(2)]
    try:
        assert [r.status_code for r in first] == [200, 200]
        third = httpx.get(f"{srv.url}/api/v1/jobs/{job_id}/events", timeout=30,
                          headers={"Authorization": f"Bearer {key}"})
        assert third.status_code == 429 and "event streams" in third.json()["detail"]
    finally:
        _close(first[0])
    # The closed stream's slot comes back (the server notices the disconnect at its next
    # keep-alive, within a poll or two).
    deadline = time.monotonic() + 30
    while True:
        again = _open_stream(srv, key, job_id)
        if again.status_code == 200 or time.monotonic() > deadline:
            break
        _close(again)
        time.sleep(0.2)
    try:
        assert again.status_code == 200
    finally:
        _close(again)
        _close(first[1])


def test_a_stream_ends_when_its_key_is_revoked(srv):
    key, job_id = _queued_job(srv, "revoked-watcher")
    resp = _open_stream(srv, key, job_id)
    lines = resp.iter_lines()
    assert next(lines).startswith("event: ")
    key_id = next(line.split()[0] for line in hptune("keys", "list", env=srv.env)
                  .stdout.splitlines() if "revoked-watcher" in line)
    hptune("keys", "revoke", key_id, env=srv.env)
    ended = threading.Event()

    def drain() -> None:
        for _ in lines:
            pass
        ended.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert ended.wait(30), "the stream went on after its key was revoked"
    finally:
        _close(resp)


def test_metrics_need_an_admin_key(srv):
    assert httpx.get(f"{srv.url}/metrics").status_code == 401
    owner = create_key(srv.env, "nosy")
    r = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {owner}"})
    assert r.status_code == 403
    admin = create_key(srv.env, "ops", admin=True)
    r = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200 and "hptune_jobs" in r.text


def test_every_response_forbids_sniffing_and_framing(srv):
    for r in (httpx.get(f"{srv.url}/healthz"), httpx.get(f"{srv.url}/api/v1/jobs"),
              httpx.post(f"{srv.url}/api/v1/jobs", content=b"x" * (REQUEST_LIMIT + 1))):
        assert r.headers["x-content-type-options"] == "nosniff", r.headers
        assert r.headers["x-frame-options"] == "DENY"
