"""50 concurrent clients for 30 seconds against a real server while 2 workers train."""

import time

import httpx
import pytest

from benchmarks.api_load import drive_service, make_keys
from tests.conftest import create_key, start_server, stop_server

CLIENTS = 50
SECONDS = 30
# 50 clients and 2 workers for 30 s: it loads the machine itself, and needs all of it.
pytestmark = pytest.mark.serial


@pytest.mark.timeout(1500)
def test_load_no_5xx_and_no_lost_submission(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'load.db'}"
    keys = make_keys(db_url, CLIENTS)
    server = start_server(tmp_path, db_url, workers=2)
    try:
        result = drive_service(server.url, keys, SECONDS)
        print("load:", result.summary())
        assert not result.errors, result.errors[:5]
        assert set(result.statuses) <= {200, 201, 429}, result.statuses
        assert len(result.created) >= CLIENTS  # every client got at least one job in

        # Every 201 is a job that runs to the end.
        admin = create_key(server.env, "ops", admin=True)
        pending = set(result.created)
        deadline = time.monotonic() + 900
        with httpx.Client(base_url=server.url, timeout=60,
                          headers={"Authorization": f"Bearer {admin}"}) as client:
            while pending and time.monotonic() < deadline:
                for job_id in sorted(pending):
                    job = client.get(f"/api/v1/jobs/{job_id}").json()
                    assert job["status"] in ("queued", "running", "succeeded"), job
                    if job["status"] == "succeeded":
                        assert job["finished"] == 1
                        pending.discard(job_id)
                time.sleep(1)
        assert not pending, f"{len(pending)} submitted jobs never finished"
    finally:
        stop_server(server)
