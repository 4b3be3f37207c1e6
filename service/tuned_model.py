"""The tuned model out of the service: a job's stored ONNX model (the best trial's, or a
chosen trial's) and predictions from it on raw feature rows (JSON or CSV).

Models are ONNX graphs with the input scaling inside (trainer.to_onnx), run by onnxruntime
(trainer.OnnxModel); the sessions of the few most recently used models are kept.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from service import artifacts
from service.db import Database
from service.errors import InvalidSpec
from service.jobs import get_job
from service.retry import DB_RETRY
from trainer import OnnxModel

# Rows one prediction request may carry; the request body limit bounds the bytes too.
MAX_PREDICT_ROWS = 10_000
# onnxruntime sessions kept, by artifact id (each is the model's size plus a little).
SESSION_CACHE = 8

_sessions: OrderedDict[str, OnnxModel] = OrderedDict()
_sessions_lock = threading.Lock()


def model_bytes(db: Database, owner: str | None, job_id: int, trial: int | None
                ) -> tuple[int, bytes]:
    """(trial number, ONNX bytes) of the job's best stored model, or of trial `trial`."""
    job = get_job(db, owner, job_id)
    number, artifact_id = DB_RETRY(artifacts.model_of, db, job, trial)
    return number, DB_RETRY(artifacts.ArtifactStore(db).read, artifact_id)


def _session(db: Database, artifact_id: str) -> OnnxModel:
    with _sessions_lock:
        model = _sessions.get(artifact_id)
        if model is not None:
            _sessions.move_to_end(artifact_id)
            return model
    model = OnnxModel(DB_RETRY(artifacts.ArtifactStore(db).read, artifact_id))
    with _sessions_lock:
        _sessions[artifact_id] = model
        while len(_sessions) > SESSION_CACHE:
            _sessions.popitem(last=False)
    return model


def parse_csv_rows(body: bytes) -> np.ndarray:
    """Rows of numbers from CSV text; a first line that is not all numbers is a header."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidSpec("the CSV body is not UTF-8 text", field="body") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and not _numeric(lines[0]):
        lines = lines[1:]
    if len(lines) > MAX_PREDICT_ROWS:
        raise InvalidSpec(f"at most {MAX_PREDICT_ROWS} rows per request", field="rows")
    if not lines:
        raise InvalidSpec("the CSV body has no rows", field="rows")
    try:
        rows = np.loadtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.float64,
                          ndmin=2)
    except ValueError as exc:
        raise InvalidSpec(f"the CSV body is not rows of numbers: {exc}", field="rows") from None
    return rows


def _numeric(line: str) -> bool:
    try:
        [float(v) for v in line.split(",")]
    except ValueError:
        return False
    return True


def predict(db: Database, owner: str | None, job_id: int, rows: Any, trial: int | None
            ) -> dict[str, Any]:
    """Predictions (and class probabilities) of the job's model for raw feature rows."""
    job = get_job(db, owner, job_id)
    number, artifact_id = DB_RETRY(artifacts.model_of, db, job, trial)
    model = _session(db, artifact_id)
    try:
        predictions, probabilities = model.predict(rows)
    except ValueError as exc:
        raise InvalidSpec(str(exc), field="rows") from None
    return {"job": job_id, "trial": number, "predictions": predictions.tolist(),
            "probabilities": None if probabilities is None else probabilities.tolist()}
