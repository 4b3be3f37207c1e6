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
