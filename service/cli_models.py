"""`hptune model ID -o model.onnx` and `hptune predict ID data.csv`: the tuned model out of
the service (REST side: service/routes/models.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

models_app = typer.Typer()

# As service/cli.py's UrlOpt and KeyOpt (not importable from there while it imports this).
UrlOpt = Annotated[str, typer.Option(envvar="HPTUNE_URL", help="API base URL.")]
KeyOpt = Annotated[str | None, typer.Option(envvar="HPTUNE_API_KEY", help="API key.")]
TrialOpt = Annotated[int | None, typer.Option(
    "--trial", min=0, help="A trial's number; default: the job's best stored model.")]


def write_output(path: Path, body: bytes, err: Any) -> None:
    """Write `body` to `path`, or say why not on `err` and exit 1 (no traceback)."""
    try:
        path.write_bytes(body)
    except OSError as exc:
        err.print(f"[red]cannot write {path}: {exc.strerror}")
        raise typer.Exit(1) from None


@models_app.command()
def model(
    job_id: Annotated[int, typer.Argument(help="The job's id.")],
    output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False,
                                         help="Where to write the ONNX model.")],
    trial: TrialOpt = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
) -> None:
    """Download a job's tuned model as ONNX (raw feature rows in; onnxruntime runs it)."""
    from service.cli import _api_call, _client, err

    number, body = _api_call(_client(url, key).model, job_id, trial)
    write_output(output, body, err)
    err.print(f"wrote the model of job {job_id}, trial {number} ({len(body)} bytes) to {output}")


@models_app.command()
def predict(
    job_id: Annotated[int, typer.Argument(help="The job's id.")],
    data: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=(
        "A CSV of raw feature rows (the dataset's columns, without the target; a header "
        "line is skipped)."))],
    trial: TrialOpt = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
) -> None:
    """Predict with a job's tuned model: one line per row, the prediction then, for
    classification, the class probabilities, comma-separated."""
    from service.cli import _api_call, _client, console

    out = _api_call(_client(url, key).predict, job_id, data.read_bytes(), trial)
    probabilities = out["probabilities"] or [None] * len(out["predictions"])
    for prediction, proba in zip(out["predictions"], probabilities, strict=True):
        extra = "" if proba is None else "," + ",".join(f"{p:.6g}" for p in proba)
        console.print(f"{prediction}{extra}", highlight=False, soft_wrap=True)
