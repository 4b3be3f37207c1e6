"""Fair scheduling across owners, on a real server with two workers."""

import time

from tests.conftest import start_server, stop_server

BIG = 1000  # owner A's trials
SMALL = 10  # owner B's trials
# B's job must finish while A's has finished less than this share of its trials.
FAIR_SHARE = 0.3
TINY = {"dataset": "iris", "max_epochs": 1, "model": {"hidden_layers": [8]},
        "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"}}
TERMINAL = ("succeeded", "failed", "cancelled")


def _finished(client, job_id):
    return client.get(f"/api/v1/jobs/{job_id}").json()


def test_a_huge_job_does_not_starve_another_owner(tmp_path, measure):
    srv = start_server(tmp_path, workers=2, extra_env={
        "HPTUNE_POLL_INTERVAL": "0.05",
        "HPTUNE_MAX_TRIALS_PER_JOB": str(BIG),
        "HPTUNE_MAX_QUEUED_TRIALS_PER_OWNER": str(BIG),
    })
    try:
        a, b = srv.client("owner-a"), srv.client("owner-b")
        r = a.post("/api/v1/jobs", json={**TINY, "name": "huge", "n_trials": BIG})
        assert r.status_code == 201, r.text
        big = r.json()["id"]
        # Both workers are on A's job before B submits: A has finished trials.
        deadline = time.monotonic() + 120
        while _finished(a, big)["finished"] < 2:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        r = b.post("/api/v1/jobs", json={**TINY, "name": "small", "n_trials": SMALL})
        assert r.status_code == 201, r.text
        small = r.json()["id"]
        a_before = _finished(a, big)["finished"]
        # Bounded poll on states: until B's job ends, or A's passes the share B should beat.
        deadline = time.monotonic() + 300
        while True:
            job_b = _finished(b, small)
            a_done = _finished(a, big)["finished"]
            if job_b["status"] in TERMINAL or a_done >= FAIR_SHARE * BIG:
                break
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        assert job_b["status"] == "succeeded", (job_b, srv.log())
        assert job_b["finished"] == SMALL
        measure("fair scheduling", f"owner A finished {a_done} of {BIG} trials (from "
                f"{a_before} when B submitted) while B's {SMALL}-trial job ran to the end")
        assert a_done < FAIR_SHARE * BIG, (
            f"owner B's {SMALL}-trial job waited while owner A's job finished {a_done} of {BIG}")
        # A's job goes on afterwards: it was shared, not stopped.
        assert a.post(f"/api/v1/jobs/{big}/cancel").status_code == 200
    finally:
        stop_server(srv)
