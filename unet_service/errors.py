"""What can stop a request, whatever way it came in: each kind is a class, raised by the
service, the pipeline and the job API alike, and turned into an answer in one place
(`api.errors` gives each kind its HTTP status; the command line prints the message). Errors
about the image itself are `imaging.errors`'. The message is what the client is told."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class. `retry_after`: seconds after which trying again may succeed."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class LimitError(ServiceError):
    """Beyond one of the service's limits (pixels, pages, upload size, memory)."""


class InvalidRequestError(ServiceError, ValueError):
    """Asks for something that cannot be given (an unknown output, options that do not go
    together, an output this model has not)."""


class UnavailableError(ServiceError):
    """The service cannot take this work now: loading, shutting down, or its queue full."""


class NotFoundError(ServiceError):
    """No such model or job (for this caller)."""


class ConflictError(ServiceError):
    """The job is not in a state that has what was asked (its result, say)."""


class StorageFullError(ServiceError):
    """The job storage has no room for an upload and its result."""


class DeadlineExceededError(ServiceError):
    """Not done within the request's deadline."""


class ClientGoneError(ServiceError):
    """The client went away before its answer."""


class InferenceError(ServiceError):
    """The batch holding the request's tiles failed; only the requests with tiles in that
    batch see this."""


class UnreadableImageError(InferenceError):
    """A batch failed because a tile of an image read from disk (a section job's page)
    could not be read: the upload's fault, not the worker's."""


class ForbiddenError(ServiceError):
    """Asks to read or write somewhere the operator has not allowed."""
