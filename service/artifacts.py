"""Trial checkpoints and tuned models: an Optuna artifact store, their retention and quota.

Bytes go through Optuna's artifact interface (optuna.artifacts.ArtifactStore: write,
open_reader, remove): by default into the service's own database (`hptune_artifacts.body`),
so workers on many machines need nothing but the database; with HPTUNE_ARTIFACT_STORE set
to a directory, into Optuna's FileSystemArtifactStore there, or to `s3://<bucket>`, into
Optuna's Boto3ArtifactStore (the `s3` extra). Either way a row of
`hptune_artifacts` says whose it is (owner, job, trial, kind) and its size, which is what
retention and the owner quota count. A model is also linked to its trial with
optuna.artifacts.upload_artifact, so optuna-dashboard lists it.

Retention (`retain`): the models of a job's best HPTUNE_KEEP_MODELS trials, and the latest
checkpoint of each trial chain that may still resume; everything else is deleted. Deleting
a job deletes its artifacts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import uuid
from typing import BinaryIO

import optuna
from sqlalchemy import delete, func, select

from service import trial_store
from service.db import Database
from service.errors import NotFound
from service.models import Artifact, Job
from service.retry import DB_RETRY
from service.status import TERMINAL
from trainer import Direction
from trainer.vocab import Metric

log = logging.getLogger("hptune.artifacts")

# optuna.artifacts (and with it boto3, where installed) is imported where bytes are read or
# written, not with this module: the API imports this module at start, and seldom serves a
# model.

CHECKPOINT, MODEL = "checkpoint", "model"
S3_PREFIX = "s3://"


class ArtifactStore:
    """Optuna's ArtifactStore protocol over hptune's database or a directory.

    `write` needs to know whose bytes it stores: use `bound(...)` for a writer.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        where = db.settings.artifact_store
        if where == "database":
            self.files = None
        elif where.startswith(S3_PREFIX):
            # Endpoint and credentials as boto3 reads them (AWS_ENDPOINT_URL, AWS_* keys).
            self.files = optuna.artifacts.Boto3ArtifactStore(where.removeprefix(S3_PREFIX))
        else:
            self.files = optuna.artifacts.FileSystemArtifactStore(where)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        if self.files is not None:
            return self.files.open_reader(artifact_id)
        with self.db.session() as s:
            body = s.scalar(select(Artifact.body).where(Artifact.id == artifact_id))
        if body is None:
            from optuna.artifacts.exceptions import ArtifactNotFound

            raise ArtifactNotFound(f"artifact {artifact_id} not found")
        return io.BytesIO(body)

    def read(self, artifact_id: str) -> bytes:
        with self.open_reader(artifact_id) as f:
            return f.read()

    def remove(self, artifact_id: str) -> None:
        if self.files is not None:
            from optuna.artifacts.exceptions import ArtifactNotFound

            with contextlib.suppress(ArtifactNotFound, FileNotFoundError):
                self.files.remove(artifact_id)
        with self.db.session() as s:
            s.execute(delete(Artifact).where(Artifact.id == artifact_id))

    def bound(self, job: Job, trial_number: int, kind: str) -> _Writer:
        return _Writer(self, job, trial_number, kind)


class QuotaExceeded(Exception):
    pass


class _Writer:
    """The store's `write` for one owner, job, trial and kind, under the owner's quota."""

    def __init__(self, store: ArtifactStore, job: Job, trial_number: int, kind: str) -> None:
        self.store, self.job, self.trial_number, self.kind = store, job, trial_number, kind

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        """Store the bytes and their row, unless they would take the owner past the quota.

        The quota is read without the owner's lock (taking it for every checkpoint would
        line up all of one owner's workers): writers racing past it overshoot it by at most
        one artifact each."""
        body = content_body.read()
        db, job = self.store.db, self.job
        with db.session() as s:
            used = s.scalar(select(func.coalesce(func.sum(Artifact.size), 0))
                            .where(Artifact.owner == job.owner))
            limit = db.settings.max_artifact_bytes_per_owner
            if used + len(body) > limit:
                raise QuotaExceeded(f"owner's artifacts would exceed {limit} bytes")
            s.add(Artifact(id=artifact_id, job_id=job.id, owner=job.owner,
                           trial_number=self.trial_number, kind=self.kind, size=len(body),
                           body=None if self.store.files is not None else body))
            if self.store.files is not None:
                # Before the row commits: a write that fails leaves no row without its file.
                self.store.files.write(artifact_id, io.BytesIO(body))


class WorkerArtifacts:
    """search.trial_reporter.TrialArtifacts for the trials of one claimed job."""

    def __init__(self, db: Database, job_id: int) -> None:
        self.db = db
        with db.session() as s:
            self.job = s.get(Job, job_id)
            s.expunge(self.job)
        self.store = ArtifactStore(db)

    def save_checkpoint(self, trial: optuna.Trial, blob: bytes) -> None:
        artifact_id = str(uuid.uuid4())
        try:
            DB_RETRY(self.store.bound(self.job, trial.number, CHECKPOINT).write,
                     artifact_id, io.BytesIO(blob))
        except QuotaExceeded as exc:
            log.warning("job %s trial %s: checkpoint not kept: %s", self.job.id, trial.number,
                        exc)
            return
        for old in _ids(self.db, self.job.id, CHECKPOINT, [trial.number], keep=artifact_id):
            self.store.remove(old)

    def load_checkpoint(self, trial: optuna.Trial) -> bytes | None:
        # Only a retry resumes: its chain is a system attribute (two queries, where reading
        # the whole trial took six on every trial).
        attrs = self.db.storage.get_trial_system_attrs(trial_store.trial_id(trial))
        chain = [int(n) for n in attrs.get("retry_history") or []]
        if not chain:
            return None
        with self.db.session() as s:
            artifact_id = s.scalar(
                select(Artifact.id).where(Artifact.job_id == self.job.id,
                                          Artifact.kind == CHECKPOINT,
                                          Artifact.trial_number.in_(chain))
                .order_by(Artifact.created_at.desc()).limit(1))
        if artifact_id is None:
            return None
        from optuna.artifacts.exceptions import ArtifactNotFound

        try:
            return self.store.read(artifact_id)
        except ArtifactNotFound:
            return None

    def save_model(self, trial: optuna.Trial, onnx: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"job-{self.job.id}-trial-{trial.number}.onnx")
            with open(path, "wb") as f:
                f.write(onnx)
            try:
                optuna.artifacts.upload_artifact(
                    artifact_store=self.store.bound(self.job, trial.number, MODEL),
                    file_path=path, study_or_trial=trial, mimetype="application/onnx")
            except QuotaExceeded as exc:
                log.warning("job %s trial %s: model not kept: %s", self.job.id, trial.number,
                            exc)
                trial.set_user_attr("model_not_kept", str(exc))


def _ids(db: Database, job_id: int, kind: str, numbers: list[int] | None = None,
         keep: str | None = None) -> list[str]:
    with db.session() as s:
        q = select(Artifact.id).where(Artifact.job_id == job_id, Artifact.kind == kind)
        if numbers is not None:
            q = q.where(Artifact.trial_number.in_(numbers))
        if keep is not None:
            q = q.where(Artifact.id != keep)
        return list(s.scalars(q))


def _rows(db: Database, job_id: int, kind: str) -> list[tuple[str, int]]:
    with db.session() as s:
        return [(r.id, r.trial_number) for r in s.execute(
            select(Artifact.id, Artifact.trial_number)
            .where(Artifact.job_id == job_id, Artifact.kind == kind))]


def ranked_models(db: Database, job: Job) -> list[tuple[int, str]]:
    """(trial number, artifact id) of the job's stored models, best trial first."""
    rows = _rows(db, job.id, MODEL)
    if not rows or not job.study_name:
        return []
    values = trial_store.states_and_values(db, job.study_name, [n for _, n in rows])
    scored = [(values[n][1], n, a) for a, n in rows
              if n in values and values[n][0] == "COMPLETE" and values[n][1] is not None]
    maximize = Metric(job.spec.get("metric", Metric.VAL_ACCURACY)).direction == \
        Direction.MAXIMIZE
    scored.sort(key=lambda t: (-t[0] if maximize else t[0], t[1]))
    return [(n, a) for _, n, a in scored]


def retain(db: Database, job_id: int) -> None:
    """Delete what the job no longer needs: models past its best HPTUNE_KEEP_MODELS trials,
    checkpoints of finished trials, and every checkpoint once the job has ended."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is not None:
            s.expunge(job)
    if job is None or not job.study_name:
        return
    store = ArtifactStore(db)
    keep = {a for _, a in ranked_models(db, job)[:db.settings.keep_models]}
    models = _rows(db, job_id, MODEL)
    # A model is saved before its trial is told: one of a trial still RUNNING (on another
    # worker) has no value to rank yet, and is judged by the retain after its tell.
    states = trial_store.states_and_values(db, job.study_name, [n for _, n in models])
    drop = [a for a, n in models if a not in keep and states.get(n, ("",))[0] != "RUNNING"]
    checkpoints = _rows(db, job_id, CHECKPOINT)
    if job.status in TERMINAL:
        drop += [a for a, _ in checkpoints]
    elif checkpoints:
        states = trial_store.states_and_values(db, job.study_name, [n for _, n in checkpoints])
        drop += [a for a, n in checkpoints if states.get(n, ("",))[0] in ("COMPLETE", "PRUNED")]
    for artifact_id in drop:
        store.remove(artifact_id)


def delete_job_artifacts(db: Database, job_id: int) -> None:
    store = ArtifactStore(db)
    for kind in (MODEL, CHECKPOINT):
        for artifact_id in _ids(db, job_id, kind):
            store.remove(artifact_id)


def job_artifact_bytes(db: Database, job_id: int) -> dict[str, int]:
    """Bytes stored for the job, by kind."""
    with db.session() as s:
        rows = s.execute(select(Artifact.kind, func.sum(Artifact.size))
                         .where(Artifact.job_id == job_id).group_by(Artifact.kind)).all()
    out = {CHECKPOINT: 0, MODEL: 0}
    out.update({k: int(n or 0) for k, n in rows})
    return out


def model_of(db: Database, job: Job, trial: int | None) -> tuple[int, str]:
    """(trial number, artifact id) of the job's best stored model, or of trial `trial`."""
    ranked = ranked_models(db, job)
    if trial is None:
        if not ranked:
            raise NotFound(f"job {job.id} has no stored model yet (models are kept for "
                           f"completed trials of objectives that export ONNX)")
        return ranked[0]
    for number, artifact_id in ranked:
        if number == trial:
            return number, artifact_id
    raise NotFound(f"job {job.id} has no stored model for trial {trial}; models are kept "
                   f"for its best {db.settings.keep_models} completed trials: "
                   f"{', '.join(str(n) for n, _ in ranked) or 'none yet'}")

