"""One set of input checks: the same odd file gets the same verdict from `/v1/segment`
(decoded in memory) and `/v1/jobs` (read by window from disk). Where one refuses it, both do,
with the same status and the same words; where one segments it, the other does too, and the
job's result equals the request's answer. The cases are those the architecture review found
answered differently (pixel types, stacks mixing strips and tiles, a thumbnail page, an
unknown compression, a looping chain, out-of-range floats) and the non-image uploads of the
hostile-input tests; crafted broken TIFFs are tests/test_hostile_tiffs.py's."""

from __future__ import annotations

import asyncio
import io
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from app_helpers import em_crop, make_app, png_bytes, running, save_tiny
from PIL import Image

from conftest import read_volume

pytestmark = pytest.mark.anyio

FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("verdict"))


def pages(n: int = 2) -> np.ndarray:
    """(n, 48, 56) uint8 crops of real EM slices."""
    return np.stack([em_crop(i, 0, 0, 48, 56) for i in range(n)])


def tiff(array: np.ndarray, **options: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="minisblack", **options)
    return buf.getvalue()


def pages_written(*writes: tuple[np.ndarray, dict]) -> bytes:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for array, options in writes:
            tif.write(array, photometric="minisblack", **options)
    return buf.getvalue()


def looped(data: bytes) -> bytes:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        offsets = [page.offset for page in tif.pages]
    out = bytearray(data)
    entries = struct.unpack_from("<H", out, offsets[-1])[0]
    struct.pack_into("<I", out, offsets[-1] + 2 + 12 * entries, offsets[0])
    return bytes(out)


def compression_99(data: bytes) -> bytes:
    """Every page's Compression tag set to 99, a scheme no decoder knows."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        at = [page.tags[259].valueoffset for page in tif.pages]
    out = bytearray(data)
    for offset in at:
        struct.pack_into("<H", out, offset, 99)
    return bytes(out)


EM = pages()
FLOATS = EM.astype(np.float32) / 255
ACCEPTED = {
    "int16": tiff(EM.astype(np.int16) - 100),
    "uint32": tiff(EM.astype(np.uint32) * 1000),
    "float64": tiff(FLOATS.astype(np.float64)),
    "1-bit": tiff(EM > 128),
    "strips and tiles": pages_written((EM[0], {"rowsperstrip": 8}), (EM[1], {"tile": (16, 16)})),
    "a thumbnail page": pages_written(
        (EM[0], {}), (EM[1], {}), (EM[0][::4, ::4].copy(), {"subfiletype": 1})
    ),
    "one page of int16": tiff(EM[0].astype(np.int16) - 100),
}
REFUSED = {
    "an unknown compression": compression_99(tiff(EM, compression="zlib")),
    "a chain of pages that loops": looped(tiff(EM)),
    "a float pixel of 1e31": tiff(np.where(FLOATS > 0.5, np.float32(1e31), FLOATS)),
    "a float pixel of 1e31 on page 2 only": tiff(np.stack([FLOATS[0], FLOATS[1] * 1e32])),
    "a NaN pixel": tiff(
        np.where(np.arange(FLOATS.size).reshape(FLOATS.shape) == 3000, np.nan, FLOATS)
    ),
    "text": b"hello, I am text\n",
    "a truncated PNG": png_bytes(EM[0])[:200],
    "an empty file": b"",
    "pages of two sizes": pages_written((EM[0], {}), (EM[1][:40], {})),
    "a hyperstack": tiff(np.stack([EM, EM]), imagej=True, metadata={"axes": "ZCYX"}),
}


async def wait_done(client: httpx.AsyncClient, job_id: str) -> dict:
    loop = asyncio.get_running_loop()
    end = loop.time() + 120  # a bound against a hang only
    while (body := (await client.get(f"/v1/jobs/{job_id}")).json())["state"] not in FINAL:
        assert loop.time() < end, body
        await asyncio.sleep(0.01)
    return body


def answer_pixels(r: httpx.Response) -> np.ndarray:
    if r.headers["content-type"] == "image/png":
        return np.asarray(Image.open(io.BytesIO(r.content)))[None]
    return read_volume(r.content).reshape(-1, *read_volume(r.content).shape[-2:])


async def test_the_same_odd_files_get_the_same_verdict_from_requests_and_jobs(
    weights: Path, tmp_path: Path
) -> None:
    app = make_app(weights, jobs_dir=tmp_path / "jobs", job_progress_s=0.02)
    async with running(app) as client:
        for case, data in REFUSED.items():
            request = await client.post("/v1/segment", files={"file": ("odd.tif", data)})
            job = await client.post("/v1/jobs", files={"file": ("odd.tif", data)})
            assert 400 <= request.status_code < 500, (case, request.text)
            assert (job.status_code, job.json()) == (request.status_code, request.json()), case
        for case, data in ACCEPTED.items():
            request = await client.post("/v1/segment", files={"file": ("odd.tif", data)})
            assert request.status_code == 200, (case, request.text)
            job = await client.post("/v1/jobs", files={"file": ("odd.tif", data)})
            assert job.status_code == 202, (case, job.text)
            done = await wait_done(client, job.json()["id"])
            assert done["state"] == "done", (case, done)
            result = await client.get(f"/v1/jobs/{done['id']}/result")
            expected = answer_pixels(request)
            assert done["input"]["pages"] == len(expected), case
            assert np.array_equal(read_volume(result.content).reshape(expected.shape), expected)
