"""A job's status, defined once: the stored `hptune_jobs.status` values and the API's.

A StrEnum, so a member equals its string: the database column, the JSON of the REST API
and comparisons with plain strings ("failed" == JobStatus.FAILED) stay as they were.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job is in its life: queued -> running -> succeeded | failed | cancelled."""

    QUEUED = "queued"  # created; no trial claimed yet
    RUNNING = "running"  # a worker claimed a trial slot
    SUCCEEDED = "succeeded"  # exactly n_trials finished
    FAILED = "failed"  # crashed trials, a timeout, or a lost dataset; `error` says which
    CANCELLED = "cancelled"  # stopped on request


# Jobs that still hold (or wait for) trial slots, and jobs that never change again.
ACTIVE: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)
TERMINAL: tuple[JobStatus, ...] = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
