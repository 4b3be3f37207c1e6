"""Response schemas of the REST API, and the body of PATCH /jobs/{id} (JobUpdate); a new
job's body is search.JobSpec."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from search import JobSpec


class TrialCounts(BaseModel):
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int


class JobPublic(BaseModel):
    id: int
    name: str
    owner: str
    status: str
    n_trials: int
    counts: TrialCounts
    finished: int
    best_value: float | None
    metric: str | None
    study_name: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]


class JobUpdate(BaseModel):
    """What PATCH /api/v1/jobs/{id} changes: n_trials, upwards only (service.lifecycle)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Within the spec's own bounds (search/spec.py), so that the two never differ.
    n_trials: Annotated[int, *JobSpec.model_fields["n_trials"].metadata] = Field(
        description="the job's new number of trials: more than it has now")


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    next: str | None = None


class TrialPublic(BaseModel):
    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    intermediate_values: dict[str, float | None]
    stop_reason: str | None
    stopped_epoch: int | None
    best_epoch: int | None
    datetime_start: str | None
    datetime_complete: str | None
    details: dict[str, Any]


class TrialsPublic(BaseModel):
    data: list[TrialPublic]
    count: int
    next: str | None = None


class ErrorItem(BaseModel):
    field: str | None
    message: str


class ErrorBody(BaseModel):
    detail: str
    errors: list[ErrorItem] = []


class DatasetPublic(BaseModel):
    id: int
    name: str
    owner: str
    filename: str
    format: str
    target: str | None
    task: str
    n_rows: int
    n_features: int
    n_classes: int
    sha256: str
    size_bytes: int
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int
    next: str | None = None
