"""Domain errors: each carries its HTTP status and a stable code for the JSON error body."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LimitExceeded(ServiceError):
    status = 422
    code = "limit_exceeded"


class UnknownFeature(ServiceError):
    status = 422
    code = "unknown_feature"


class InvalidFeature(ServiceError):
    status = 422
    code = "invalid_feature"


class UnknownFilter(ServiceError):
    status = 422
    code = "unknown_filter"


class NotReady(ServiceError):
    status = 503
    code = "not_ready"


class VersionRefused(ServiceError):
    status = 409
    code = "version_refused"


class ModelLoadError(Exception):
    """A model version on disk that cannot be served; the message says why."""
