"""KServe v2 tensors in and out: the request's JSON header, the input image from JSON data or
from the binary tensor extension, and the reply as JSON or binary.

Large JSON tensors are the danger to the event loop: a JSON parser holds the GIL for the
whole document, so a thread alone does not free the loop. So the body has its own size limit
(one orjson parse of it takes tens of milliseconds), lists become arrays in pieces, and
replies are written in pieces by a generator the server pulls from a thread pool. Binary
data is never copied: arrays are read from and written to memoryviews.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unet_service.api.errors import ApiError
from unet_service.imaging.encode import slices
from unet_service.pipeline.outputs import OUTPUTS as PIPELINE_OUTPUTS

DATATYPES: dict[str, type[np.generic]] = {
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "FP32": np.float32,
}
# The outputs v2 offers (pipeline.outputs defines them all; an overlay is a picture, not a
# tensor), and each one's tensor datatype.
OUTPUT_DATATYPES = {"mask": "UINT8", "probabilities": "FP32", "instances": "UINT32"}
OUTPUTS = tuple(o for o in PIPELINE_OUTPUTS if o in OUTPUT_DATATYPES)
DEFAULT_OUTPUTS = ("mask", "probabilities")  # when a request names none
# Values converted or written per piece: a few milliseconds of work with the GIL held.
PIECE = 1 << 16
# The request parameter "layout": the input's axes, and its rank. Without it, the rank
# decides (2: HW, 3: HWC, 4: 1CHW), as always; a stack of D pages must say DHW or DHWC, so
# that no [H, W, C] image is ever taken for a stack, nor the reverse.
LAYOUTS = {"HW": 2, "HWC": 3, "1CHW": 4, "DHW": 3, "DHWC": 4}
STACK_LAYOUTS = ("DHW", "DHWC")
_BY_RANK = {2: "HW", 3: "HWC", 4: "1CHW"}
# Upper bounds of a value's JSON text, separator included ("255," and "1.2345678e-05,").
JSON_BYTES_PER_VALUE = {"UINT8": 4, "FP32": 16, "UINT32": 11}


class InferInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[int]
    datatype: str
    data: Any = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def parse_request(header: bytes | memoryview) -> InferRequest:
    """The request's JSON (the whole body, or the binary extension's header part)."""
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise ApiError(
            422, f"invalid inference request: the body is not valid JSON ({e})"
        ) from None
    try:
        return InferRequest.model_validate(document)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, f"invalid inference request: {loc}: {first.get('msg')}") from None


def tensor_to_pages(
    tensor: InferInput,
    max_pixels: int,
    raw: memoryview | bytes | None = None,
    layout: str | None = None,
    max_pages: int = 1,
) -> list[np.ndarray]:
    """A v2 input tensor -> its pages, each (H, W, C) in the tensor's dtype (one page but
    for the stack layouts DHW and DHWC), from its JSON `data` or, with the binary tensor
    extension, from `raw` little-endian bytes. Raises ApiError (422 for bad shape, layout,
    datatype or data; 413 for too many pixels, all pages together, or pages)."""
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise ApiError(
            422,
            f"input {tensor.name!r}: datatype {tensor.datatype!r} is not supported; use "
            f"{', '.join(DATATYPES)}",
        )
    shape = tensor.shape
    layout = layout or _BY_RANK.get(len(shape))
    if any(s < 0 for s in shape) or layout is None or LAYOUTS[layout] != len(shape):
        raise ApiError(
            422,
            f"input {tensor.name!r}: shape {shape} is not "
            + (f"a {layout} tensor" if layout else "an image")
            + "; use [H, W], [H, W, C] or [1, C, H, W], or for a stack of pages [D, H, W] "
            'or [D, H, W, C] with the request parameter "layout": "DHW" or "DHWC"',
        )
    if layout == "1CHW" and shape[0] != 1:
        raise ApiError(
            422,
            f"input {tensor.name!r}: shape {shape} holds {shape[0]} images; send one image "
            'per request, or a stack of pages as [D, H, W] with "layout": "DHW" (the '
            "server batches tiles across requests itself)",
        )
    pages = shape[0] if layout in STACK_LAYOUTS else 1
    axis = {"HW": 0, "HWC": 0, "1CHW": 2, "DHW": 1, "DHWC": 1}[layout]
    height, width = shape[axis], shape[axis + 1]
    if height * width == 0 or math.prod(shape) == 0:
        raise ApiError(422, f"input {tensor.name!r}: shape {shape} is empty")
    if pages > max_pages:
        raise ApiError(413, f"the stack has {pages} pages, more than the limit of {max_pages}")
    if pages * height * width > max_pixels:
        what = "image is" if pages == 1 else f"stack of {pages} pages of"
        raise ApiError(
            413,
            f"{what} {width}x{height} = {pages * height * width} pixels, more than the "
            f"limit of {max_pixels}",
        )
    values = _from_json(tensor, dtype) if raw is None else _from_binary(tensor, raw, dtype)
    image = values.astype(dtype, copy=False).reshape(shape)
    if layout == "HW":
        return [image[:, :, None]]
    if layout == "1CHW":
        return [np.ascontiguousarray(image[0].transpose(1, 2, 0))]
    if layout == "DHW":
        return [page[:, :, None] for page in image]
    return list(image) if layout == "DHWC" else [image]


def _from_binary(
    tensor: InferInput, raw: memoryview | bytes, dtype: type[np.generic]
) -> np.ndarray:
    item = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(tensor.shape) * item.itemsize
    if len(raw) != expected:
        raise ApiError(
            422,
            f"input {tensor.name!r}: {len(raw)} bytes of binary data, shape {tensor.shape} of "
            f"{tensor.datatype} needs {expected}",
        )
    values = np.frombuffer(raw, dtype=item)
    if dtype is np.float32 and not np.isfinite(values).all():
        raise ApiError(422, f"input {tensor.name!r}: FP32 data must be finite")
    return values


def _pieces(data: list, shape: list[int]) -> Iterator[np.ndarray]:
    """A flat list, or a list nested as `shape`, as flat arrays of at most about PIECE
    values each, so no single conversion holds the GIL for long."""
    depth, node = 0, data
    while isinstance(node, list) and node:
        depth, node = depth + 1, node[0]
    if depth == 1:
        for start in range(0, len(data), PIECE):
            yield np.asarray(data[start : start + PIECE])
        return
    if depth != len(shape):
        raise ValueError("nesting does not match the shape")
    # Descend to the level whose sub-lists hold at most PIECE values (at least one level).
    level = 1
    while level < len(shape) - 1 and math.prod(shape[level:]) > PIECE:
        level += 1
    nodes: list = data  # the sub-lists of level 1
    for _ in range(level - 1):
        nodes = [child for node in nodes if isinstance(node, list) for child in node]
    if len(nodes) != math.prod(shape[:level]):
        raise ValueError("nesting does not match the shape")
    for node in nodes:
        piece = np.asarray(node)
        if list(piece.shape) != shape[level:]:
            raise ValueError("nesting does not match the shape")
        yield piece.ravel()


def _from_json(tensor: InferInput, dtype: type[np.generic]) -> np.ndarray:
    if not isinstance(tensor.data, list):
        raise ApiError(422, f"input {tensor.name!r}: data must be a (flat or nested) list")
    shape = tensor.shape
    try:
        pieces = list(_pieces(tensor.data, shape))
        values = np.concatenate(pieces) if pieces else np.zeros(0)
    except (ValueError, TypeError):
        raise ApiError(422, f"input {tensor.name!r}: data is ragged or not numeric") from None
    if values.size != math.prod(shape):
        raise ApiError(
            422,
            f"input {tensor.name!r}: data has {values.size} values, shape {shape} needs "
            f"{math.prod(shape)}",
        )
    if values.dtype.kind not in "iuf" or (dtype is not np.float32 and values.dtype.kind == "f"):
        if dtype is np.float32:
            kind = "numbers"
        else:
            info = np.iinfo(dtype)
            kind = f"integers in {info.min}..{info.max}"
        raise ApiError(422, f"input {tensor.name!r}: {tensor.datatype} data must be {kind}")
    if dtype is np.float32:
        # Checked as float32: a finite JSON number beyond its range (1e300) becomes inf.
        with np.errstate(over="ignore"):
            values = values.astype(np.float32)
        if not np.isfinite(values).all():
            raise ApiError(
                422, f"input {tensor.name!r}: FP32 data must be finite and within FP32 range"
            )
    else:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise ApiError(
                422,
                f"input {tensor.name!r}: values outside the {tensor.datatype} range "
                f"{info.min}..{info.max}",
            )
    return values


def json_reply_bytes(values_per_output: dict[str, int]) -> int:
    """An upper bound of a reply's size when these outputs (name -> values) go as JSON."""
    return sum(
        n * JSON_BYTES_PER_VALUE[OUTPUT_DATATYPES[name]] for name, n in values_per_output.items()
    )


def output_array(
    name: str,
    mask: np.ndarray,
    probabilities: np.ndarray | None,
    instances: np.ndarray | None = None,
) -> np.ndarray:
    """One page's output: mask [H, W], instances [H, W], probabilities [H, W] for one
    class or [K, H, W]. A stack's outputs are these stacked on a leading page axis."""
    if name == "mask":
        return mask
    if name == "instances":
        assert instances is not None
        return instances
    assert probabilities is not None
    return probabilities[0] if probabilities.shape[0] == 1 else probabilities


def encode_reply(
    content: dict[str, Any], outputs: list[tuple[dict[str, Any], np.ndarray, bool]]
) -> tuple[Iterator[bytes | memoryview], int | None, int | None]:
    """The reply body as pieces, its length when known, and the binary extension's header
    length when any output goes binary. `outputs` holds (entry, array, binary) per output,
    where entry has name, datatype and shape. JSON data is written PIECE values at a time;
    binary data goes out as memoryviews of the arrays themselves. Call it off the event
    loop: with binary outputs the header (JSON data of the other outputs included) is
    written here, since its length goes in a response header."""
    blobs = []
    for entry, array, as_binary in outputs:
        if as_binary:
            entry["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(_little_endian_view(array))
    listed = [(entry, None if as_binary else array) for entry, array, as_binary in outputs]
    if not blobs:
        return _json_pieces(content, listed), None, None
    head = b"".join(_json_pieces(content, listed))
    length = len(head) + sum(len(blob) for blob in blobs)
    return itertools.chain([head], *map(slices, blobs)), length, len(head)


def _json_pieces(
    content: dict[str, Any], outputs: list[tuple[dict[str, Any], np.ndarray | None]]
) -> Iterator[bytes]:
    yield orjson.dumps(content)[:-1] + b',"outputs":['
    for i, (entry, array) in enumerate(outputs):
        separator = b"," if i else b""
        if array is None:  # binary: the data follows the JSON header
            yield separator + orjson.dumps(entry)
            continue
        yield separator + orjson.dumps(entry)[:-1] + b',"data":['
        flat = np.ascontiguousarray(array).ravel()
        for start in range(0, flat.size, PIECE):
            piece = orjson.dumps(flat[start : start + PIECE], option=orjson.OPT_SERIALIZE_NUMPY)
            yield (b"," if start else b"") + piece[1:-1]
        yield b"]}"
    yield b"]}"


def _little_endian_view(array: np.ndarray) -> memoryview:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return memoryview(little).cast("B")
