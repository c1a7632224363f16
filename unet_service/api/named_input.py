"""A job's input named instead of uploaded: `POST /v1/jobs` with a JSON body or an HTML form
(`application/x-www-form-urlencoded`) holding `input` (a path or URL of an OME-Zarr image)
and, optionally, `output_location` (where its OME-Zarr result goes)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from urllib.parse import parse_qs

from fastapi import Request

from unet_service.api.errors import ApiError
from unet_service.api.uploads import limited_body

# A named input's body is a few paths: anything larger is not one.
MAX_BODY = 64 << 10
NAMED_TYPES = ("application/json", "application/x-www-form-urlencoded")
FIELDS = ("input", "output_location")


@dataclass(frozen=True)
class NamedInput:
    input: str
    output_location: str | None


def names_input(request: Request) -> bool:
    """Whether the body names the input (JSON or a form) rather than carrying it."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type in NAMED_TYPES


async def read_named_input(request: Request) -> NamedInput:
    """The body's `input` and `output_location`; 422 for anything else."""
    body = b""
    async for chunk in limited_body(request, math.inf):  # within the request's deadline
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"a job's body naming its input is at most {MAX_BODY >> 10} KiB")
    if request.headers.get("content-type", "").lower().startswith("application/json"):
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(422, "the body is not JSON") from None
        if not isinstance(fields, dict):
            raise ApiError(422, 'the JSON body must be an object: {"input": "PATH_OR_URL"}')
    else:
        try:
            form = parse_qs(body.decode(), strict_parsing=bool(body), max_num_fields=10)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(422, "the form body is malformed") from None
        fields = {key: values[-1] for key, values in form.items()}
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ApiError(422, f"unknown field(s) {', '.join(unknown)}: a job names {FIELDS}")
    values = [fields.get(name) for name in FIELDS]
    if not isinstance(values[0], str) or not values[0]:
        raise ApiError(422, "the body must name the input: input=PATH_OR_URL")
    if values[1] is not None and not isinstance(values[1], str):
        raise ApiError(422, "output_location must be a path or URL")
    return NamedInput(values[0], values[1] or None)
