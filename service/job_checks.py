"""The checks of a job spec that need the settings, the database or what is installed (the
spec's own checks run in pydantic, search.spec): limits, the dataset and its task, the
sampler, the objective and its parameters, and a trial's memory."""

from __future__ import annotations

from search import JobSpec
from search.datasets import bundled_names, bundled_task
from search.memory import bundled_shape, largest_trial_memory, megabytes, memory_field, output_units
from search.objective_space import ParamError, check_space
from search.objectives import UnknownObjective, get_objective
from search.study import sampler_available
from service.db import Database
from service.errors import InvalidSpec, NotFound
from trainer import Task


def check_spec(db: Database, owner: str, spec: JobSpec) -> None:
    """Checks that need the settings or the database; the spec's own checks ran in pydantic."""
    s = db.settings
    if spec.n_trials > s.max_trials_per_job:
        raise InvalidSpec(f"n_trials must be <= {s.max_trials_per_job}", field="n_trials")
    if spec.max_epochs > s.max_epochs_per_trial:
        raise InvalidSpec(f"max_epochs must be <= {s.max_epochs_per_trial}", field="max_epochs")
    if spec.timeout_seconds is not None and spec.timeout_seconds > s.max_timeout_seconds:
        raise InvalidSpec(f"timeout_seconds must be <= {s.max_timeout_seconds:g}",
                          field="timeout_seconds")
    if isinstance(spec.dataset, str):
        if spec.dataset not in bundled_names():
            raise InvalidSpec(
                f"unknown dataset {spec.dataset!r}; known: {', '.join(bundled_names())} "
                "or the integer id of an uploaded dataset", field="dataset")
        task = bundled_task(spec.dataset)
        shape = bundled_shape(spec.dataset)
    else:
        from service.datasets import get_dataset

        try:
            row = get_dataset(db, owner, spec.dataset)
        except NotFound:
            raise InvalidSpec(f"no dataset with id {spec.dataset}", field="dataset") from None
        task = Task(row.task)
        shape = (row.n_rows, row.n_features, output_units(row.task, row.n_classes))
    missing = sampler_available(spec.sampler.name)
    if missing:
        raise InvalidSpec(missing, field="sampler.name")
    _check_objective(spec, task)
    allowed = task.metrics
    if spec.metric not in allowed:
        raise InvalidSpec(f"metric '{spec.metric}' does not fit a {task} dataset; use one of "
                          f"{', '.join(allowed)}", field="metric")
    _check_trial_memory(s.max_trial_bytes, spec, *shape)


def _check_objective(spec: JobSpec, task: Task) -> None:
    """The spec's objective is installed, trains this task, and takes the searched params."""
    try:
        objective = get_objective(spec.objective)
    except UnknownObjective as exc:
        raise InvalidSpec(str(exc), field="objective") from None
    if task not in objective.tasks:
        raise InvalidSpec(f"objective {spec.objective!r} does not train {task} datasets",
                          field="objective")
    try:
        check_space(spec, objective)
    except ParamError as exc:
        raise InvalidSpec(exc.message, field=exc.field) from None


def _check_trial_memory(limit: int, spec: JobSpec, n_rows: int, n_features: int,
                        n_outputs: int) -> None:
    """Refuse a job whose largest trial would need more than `limit` bytes (a worker killed
    for memory would be killed again by every retry), naming the field to shrink."""
    estimate = largest_trial_memory(spec, n_rows, n_features, n_outputs)
    if estimate.total > limit:
        raise InvalidSpec(
            f"a trial of this job may need about {megabytes(estimate.total)} of memory "
            f"(largest part: {estimate.largest_part()}, for {n_rows} rows x {n_features} "
            f"features), more than the limit of {megabytes(limit)} (HPTUNE_MAX_TRIAL_BYTES); "
            "use fewer or narrower layers or smaller batches",
            field=memory_field(spec, estimate))
