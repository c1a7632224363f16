"""Crafted TIFFs get one verdict on both paths: `/v1/segment` (decoded in memory,
imaging.pages) and `/v1/jobs` (read by window from disk, imaging.sources) answer the same
4xx with the same words, before any pixel is computed; a job is never accepted for fewer
pages than its file has, and never fails with a server error."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import httpx
import pytest
import tifffile
from app_helpers import em_crop, make_app, running, save_tiny, tiff_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("hostile"))


def ifd_offsets(data: bytes) -> list[int]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        return [page.offset for page in tif.pages]


def with_tag(data: bytes, code: int, value: int, page: int = 0) -> bytes:
    """`data` with one SHORT or LONG tag of one page overwritten in place."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        tag = tif.pages[page].tags[code]
        fmt = "<H" if tag.dtype == 3 else "<I"
        at = tag.valueoffset
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def stack(n: int = 3, **options: object) -> bytes:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for i in range(n):
            tif.write(em_crop(i, 0, 0, 64, 80), **options)
    return buf.getvalue()


def cut_after_page(data: bytes, pages: int) -> bytes:
    """The file cut where page `pages + 1`'s header starts: the chain of pages points past
    the end, while every pixel of the first pages is still there."""
    return data[: ifd_offsets(data)[pages]]


def looped(data: bytes) -> bytes:
    """The last page's next-page offset pointing back at the first page."""
    offsets = ifd_offsets(data)
    out = bytearray(data)
    entries = struct.unpack_from("<H", out, offsets[-1])[0]
    struct.pack_into("<I", out, offsets[-1] + 2 + 12 * entries, offsets[0])
    return bytes(out)


TILED = {"tile": (32, 32), "compression": "zlib"}
STRIPS = {"rowsperstrip": 16}
CASES = {
    "a 3-page stack cut after page 1": (
        cut_after_page(stack(), 1),
        "truncated or corrupt after page 1",
    ),
    "a 3-page stack cut after page 2": (
        cut_after_page(stack(), 2),
        "truncated or corrupt after page 2",
    ),
    "a tiled stack cut after page 1": (
        cut_after_page(stack(**TILED), 1),
        "truncated or corrupt after page 1",
    ),
    "a chain of pages that loops": (looped(stack()), "loops at page 4"),
    "TileLength 0": (with_tag(stack(1, **TILED), 323, 0), "page 1 declares tiles of 32x0"),
    "TileWidth 0": (with_tag(stack(1, **TILED), 322, 0), "page 1 declares tiles of 0x32"),
    "TileLength 0 on page 2": (
        with_tag(stack(2, **TILED), 323, 0, page=1),
        "page 2 declares tiles of 32x0",
    ),
    "RowsPerStrip 0": (with_tag(stack(1, **STRIPS), 278, 0), "declares strips of 0 rows"),
}


async def test_crafted_tiffs_get_the_same_422_from_both_paths(
    weights: Path, tmp_path: Path
) -> None:
    app = make_app(weights, jobs_dir=tmp_path / "jobs", job_progress_s=0.02)
    async with running(app) as client:
        for case, (data, words) in CASES.items():
            answers: list[httpx.Response] = []
            for path in ("/v1/segment", "/v1/jobs"):
                r = await client.post(path, files={"file": ("crafted.tif", data)})
                assert r.status_code == 422, (case, path, r.status_code, r.text)
                assert set(r.json()) == {"error"}
                assert words in r.json()["error"], (case, path, r.json())
                answers.append(r)
            assert answers[0].json() == answers[1].json(), case
        # The sound files they were made from are accepted by both.
        for data in (stack(), stack(**TILED), stack(1, **STRIPS)):
            assert (await client.post("/v1/segment", files={"file": data})).status_code == 200
            job = await client.post("/v1/jobs", files={"file": ("ok.tif", data)})
            assert job.status_code == 202, job.text
    folders = [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]
    assert len(folders) == 3  # the refused uploads left nothing behind


async def test_a_one_page_tiff_is_still_one_page(weights: Path, tmp_path: Path) -> None:
    """The chain check reads the last page's next-page offset: a file whose only page ends
    the chain is whole, on both paths."""
    data = tiff_bytes(em_crop(0, 0, 0, 40, 50))
    app = make_app(weights, jobs_dir=tmp_path / "jobs")
    async with running(app) as client:
        r = await client.post("/v1/segment", files={"file": ("one.tif", data)})
        assert r.status_code == 200 and r.headers["x-pages"] == "1"
        r = await client.post("/v1/jobs", files={"file": ("one.tif", data)})
        assert r.status_code == 202 and r.json()["input"]["pages"] == 1
