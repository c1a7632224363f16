"""Reading request bodies under a size limit: the declared Content-Length is checked before
anything is read, and bytes are counted while reading, so a client that lies or streams
chunked gets 413 after at most the limit, never after the whole upload."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from unet_service.api.errors import ApiError

ARRIVED = "unet.arrived"  # scope key: when the request arrived, set by the metrics middleware
# Room for the multipart boundaries and part headers around a file of the maximum size.
MULTIPART_SLACK = 64 * 1024
# Bodies above this are joined in a worker thread.
JOIN_IN_THREAD = 1 << 20


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the upload is larger than the limit of {limit / 2**20:g} MiB")


def arrival(request: Request) -> float:
    """When the request arrived (set by the metrics middleware), as time.monotonic()."""
    return request.scope.get(ARRIVED, time.monotonic())


async def limited_body(
    request: Request, limit: float, *, per_chunk: bool = False
) -> AsyncGenerator[bytes, None]:
    """The body's chunks, at most `limit` bytes, all within the request's deadline: a client
    that stalls mid-upload gets 408 when UNET_REQUEST_TIMEOUT_S has passed since its arrival,
    instead of holding its connection for as long as it likes. `per_chunk`: the timeout is
    for each chunk instead (a job's upload of gigabytes may take long, but must not stall)."""
    timeout = request.app.state.settings.request_timeout_s
    deadline = arrival(request) + timeout
    received = 0
    chunks = request.stream().__aiter__()
    try:
        while True:
            if per_chunk:
                deadline = time.monotonic() + timeout
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                what = "stalled for more than" if per_chunk else "did not arrive within"
                raise ApiError(
                    408, f"the upload {what} {timeout:g} s (UNET_REQUEST_TIMEOUT_S)"
                ) from None
            received += len(chunk)
            if received > limit:
                raise _TooLarge
            yield chunk
    except ClientDisconnect:
        # Gone mid-upload: nobody reads the answer, but it must not count as a server error
        # (an unhandled ClientDisconnect is logged with a traceback and counted as a 500).
        raise ApiError(499, "the client closed the connection during the upload") from None


def _check_declared_length(request: Request, allowed: int, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise ApiError(400, "invalid Content-Length header") from None
    if length > allowed:
        raise _too_large(limit)


async def read_body(
    request: Request, limit: int, too_large: Callable[[int], ApiError] = _too_large
) -> bytes:
    """The whole body, at most `limit` bytes (else the error `too_large(limit)` makes)."""
    declared = request.headers.get("content-length")
    try:
        _check_declared_length(request, limit, limit)
    except ApiError as e:
        raise (too_large(limit) if e.status == 413 else e) from None
    chunks = []
    try:
        async for chunk in limited_body(request, limit):
            chunks.append(chunk)
    except _TooLarge:
        raise too_large(limit) from None
    if declared is None or int(declared) < JOIN_IN_THREAD:
        return b"".join(chunks)
    # bytes.join copies without the GIL: in a thread, a big body does not stall the loop.
    return await asyncio.to_thread(b"".join, chunks)


async def read_image_upload(request: Request, limit: int) -> bytes:
    """The image bytes of a `multipart/form-data` upload (field `file`) or of a raw image
    body (`Content-Type: image/*` or `application/octet-stream`), at most `limit` bytes."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        _check_declared_length(request, limit + MULTIPART_SLACK, limit)
        parser = MultiPartParser(
            request.headers,
            limited_body(request, limit + MULTIPART_SLACK),
            max_files=1,
            max_fields=8,
        )
        try:
            form = await parser.parse()
        except _TooLarge:
            raise _too_large(limit) from None
        except MultiPartException as e:
            raise ApiError(422, f"malformed multipart body: {e.message}") from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(
                    422, "the multipart body needs the image in a file field named 'file'"
                )
            data = await upload.read()
        finally:
            await form.close()
        if len(data) > limit:
            raise _too_large(limit)
        return data
    if content_type.startswith(("image/", "application/octet-stream")):
        return await read_body(request, limit)
    raise unsupported_content_type(content_type)


def unsupported_content_type(content_type: str) -> ApiError:
    shown = content_type or "none"
    return ApiError(
        415,
        f"unsupported Content-Type ({shown}): send multipart/form-data with the image in "
        "field 'file', or the raw image bytes as image/* or application/octet-stream",
    )


def image_upload_body(description: str) -> dict:
    """The OpenAPI request body of a route that takes one image as multipart field `file`
    or as the raw bytes (`read_image_upload`)."""
    binary = {"type": "string", "format": "binary"}
    return {
        "required": True,
        "description": description,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {**binary, "description": "The image."}},
                }
            },
            "application/octet-stream": {"schema": binary},
        },
    }
