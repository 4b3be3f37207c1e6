"""Domain errors; one exception handler in the API maps them to JSON responses."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a service call may raise on purpose."""

    status_code = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class InvalidSpec(ServiceError):
    status_code = 422


class Unauthorized(ServiceError):
    status_code = 401


class Forbidden(ServiceError):
    status_code = 403


class DatabaseUnavailable(ServiceError):
    status_code = 503


class TooLarge(ServiceError):
    status_code = 413


class QuotaExceeded(ServiceError):
    status_code = 429


def one_line(exc: BaseException | None) -> str:
    """`Type: first line` of an error, naming the driver's error under Optuna's wrapper."""
    import optuna  # here: the API's error types stay importable without Optuna

    if exc is None:
        return ""
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
