"""A section job's upload as a stream of chunks, so that it can go to disk as it arrives
(gigabytes never pass through memory). The same two forms as /v1/segment: the image in
a multipart field `file`, or the raw image body."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from unet_service.api.errors import ApiError
from unet_service.api.uploads import MULTIPART_SLACK, limited_body, unsupported_content_type


class _FilePart:
    """python-multipart callbacks that keep the bytes of the part named `file` and note
    whether the body was well formed."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.found = False
        self.filename = ""
        self.ended = False
        self._in_file = False
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def _add(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _part_begin(self) -> None:
        self._headers = {}
        self._in_file = False

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._in_file = options.get(b"name") == b"file" and not self.found
        if self._in_file:
            self.found = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")[:200]

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.data.append(bytes(data[start:end]))

    def _end(self) -> None:
        self.ended = True


class StreamedUpload:
    """The uploaded image's bytes, chunk by chunk (`chunks()`), at most about `limit` bytes
    of body (the caller counts the image's own bytes against its limits), and the name the
    client gave the file. A stalled upload gets 408."""

    def __init__(self, request: Request, limit: int) -> None:
        self.request = request
        self.limit = limit
        self.filename = ""

    async def chunks(self) -> AsyncIterator[bytes]:
        request = self.request
        content_type = request.headers.get("content-type", "")
        lowered = content_type.lower()
        if lowered.startswith(("image/", "application/octet-stream")):
            async for chunk in limited_body(request, self.limit, per_chunk=True):
                yield chunk
            return
        if not lowered.startswith("multipart/form-data"):
            raise unsupported_content_type(lowered)
        _, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if not boundary:
            raise ApiError(422, "malformed multipart body: no boundary in its Content-Type")
        part = _FilePart()
        parser = MultipartParser(boundary, part.callbacks())
        body = limited_body(request, self.limit + MULTIPART_SLACK, per_chunk=True)
        try:
            async for chunk in body:
                parser.write(chunk)
                self.filename = part.filename
                for data in part.data:
                    yield data
                part.data.clear()
            parser.finalize()
        except ValueError as e:  # python-multipart's parse errors are ValueErrors
            raise ApiError(422, f"malformed multipart body: {e}") from None
        if not part.found:
            raise ApiError(422, "the multipart body needs the image in a file field named 'file'")
        if not part.ended:
            raise ApiError(422, "malformed multipart body: it ends before its closing boundary")
