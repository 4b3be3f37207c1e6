"""The tuned model of a job: download it as ONNX, or predict with it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import tuned_model
from service.deps import DbDep, JobId, OwnerDep
from service.errors import InvalidSpec
from service.tuned_model import MAX_PREDICT_ROWS

router = APIRouter(prefix="/api/v1/jobs", tags=["models"])

TrialQuery = Annotated[int | None, Query(
    ge=0, le=2**31 - 1, description="a trial's number; default: the job's best stored model")]


class PredictBody(BaseModel):
    """Raw feature rows, as the dataset's columns were before any scaling."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rows: list[Annotated[list[float], Field(min_length=1, max_length=10_000)]] = Field(
        min_length=1, max_length=MAX_PREDICT_ROWS)


class Predictions(BaseModel):
    job: int
    trial: int
    predictions: list[Any]
    probabilities: list[list[float]] | None


@router.get("/{job_id}/model", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
def get_model(job_id: JobId, db: DbDep, owner: OwnerDep, trial: TrialQuery = None) -> Response:
    """The job's tuned model as ONNX (raw feature rows in; predictions, and class
    probabilities for classification, out): the best trial's, or `?trial=N`'s."""
    number, body = tuned_model.model_bytes(db, owner, job_id, trial)
    name = f"job-{job_id}-trial-{number}.onnx"
    return Response(body, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}"',
                             "X-Hptune-Trial": str(number)})


@router.post("/{job_id}/predict", response_model=Predictions,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": PredictBody.model_json_schema()},
                 "text/csv": {"schema": {"type": "string"}}}}})
async def predict(job_id: JobId, request: Request, db: DbDep, owner: OwnerDep,
                  trial: TrialQuery = None) -> dict[str, Any]:
    """Predictions of the job's model for raw feature rows: JSON `{"rows": [[...], ...]}`
    or a CSV body (Content-Type text/csv; a header line is skipped)."""
    from starlette.concurrency import run_in_threadpool

    body = await request.body()
    if request.headers.get("content-type", "").split(";")[0].strip() == "text/csv":
        rows: Any = tuned_model.parse_csv_rows(body)
    else:
        try:
            rows = PredictBody.model_validate_json(body).rows
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "body"
            raise InvalidSpec(f"{field}: {err['msg']}", field=field) from None
    return await run_in_threadpool(tuned_model.predict, db, owner, job_id, rows, trial)
