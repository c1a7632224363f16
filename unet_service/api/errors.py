"""Every error leaves the service as JSON `{"error": "..."}` (the KServe v2 error shape),
with the right status code and never a stack trace. The one place where what went wrong
(`unet_service.errors`, `imaging.errors`: raised wherever it is found, without a word of
HTTP) becomes an HTTP answer is `answer_for`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from unet_service.errors import (
    ClientGoneError,
    ConflictError,
    DeadlineExceededError,
    ForbiddenError,
    InferenceError,
    InvalidRequestError,
    LimitError,
    NotFoundError,
    ServiceError,
    StorageFullError,
    UnavailableError,
)
from unet_service.imaging.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)

log = logging.getLogger("unet_service.api.errors")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# Each kind of error, most specific first, and its status.
STATUS: tuple[tuple[type[Exception], int], ...] = (
    (ImageTooLargeError, 413),
    (CorruptImageError, 422),  # a supported format whose data cannot be decoded
    (UnsupportedImageError, 415),  # not an image we read
    (ImageError, 422),  # empty, truncated, unusable pixels
    (LimitError, 413),
    (InvalidRequestError, 422),
    (ForbiddenError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (StorageFullError, 507),
    (UnavailableError, 503),
    (DeadlineExceededError, 504),
    (ClientGoneError, 499),  # nginx's "client closed request": nobody reads it
    (InferenceError, 500),
)


def answer_for(exc: ImageError | ServiceError) -> tuple[int, str, dict[str, str]]:
    """(status, message, headers) of the answer to a request that `exc` stopped."""
    status = next(code for kind, code in STATUS if isinstance(exc, kind))
    message = str(exc)
    if isinstance(exc, InferenceError):
        message = f"{message}; see the server log"
    retry = getattr(exc, "retry_after", None)
    return status, message, {"Retry-After": str(retry)} if retry is not None else {}


def as_api_error(exc: ImageError | ServiceError) -> ApiError:
    status, message, headers = answer_for(exc)
    return ApiError(status, message, headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(ImageError)
    @app.exception_handler(ServiceError)
    async def _domain_error(request: Request, exc: ImageError | ServiceError) -> JSONResponse:
        return error_response(*answer_for(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, detail, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe_validation(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error; see the server log")


# How every error answer is documented in the OpenAPI document: a JSON body {"error": "..."}.
ERROR_RESPONSE = {"content": {"application/json": {"example": {"error": "..."}}}}
