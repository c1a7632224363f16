"""Decoding stacks (imaging.pages): every page of a TIFF, checked from its headers before any
pixel is read, and the clear errors for files whose pages do not add up."""

from __future__ import annotations

import io
import logging
import struct
import time
import tracemalloc

import numpy as np
import pytest
import tifffile
from app_helpers import em_crop, tiff_bytes, to_uint16
from PIL import Image

from unet_service.imaging.decode import decode_image
from unet_service.imaging.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    TooManyPagesError,
)
from unet_service.imaging.pages import decode_pages
from unet_service.imaging.tiff_volume import volume_bytes


def ifd_offsets(data: bytes) -> list[int]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        return [page.offset for page in tif.pages]


def test_every_page_in_order_in_its_own_type() -> None:
    pages = [to_uint16(em_crop(i, 0, 0, 40, 50)) for i in range(3)]
    out = decode_pages(tiff_bytes(*pages))
    assert len(out) == 3
    for got, want in zip(out, pages, strict=True):
        assert got.shape == (40, 50, 1) and got.dtype == np.uint16
        assert np.array_equal(got[..., 0], want)


def test_one_page_and_other_formats_decode_as_decode_image() -> None:
    pixels = em_crop(0, 0, 0, 30, 20)
    for data in (tiff_bytes(pixels), _png(pixels)):
        (page,) = decode_pages(data)
        assert np.array_equal(page, decode_image(data))


def test_rgb_pages_and_a_shared_integer_range() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (2, 16, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb, photometric="rgb")
    out = decode_pages(buf.getvalue())
    assert [p.shape for p in out] == [(16, 24, 3)] * 2 and np.array_equal(out[1], rgb[1])
    # int32 pages: one fits in 8 bits, the other does not; both must get one type.
    low, high = np.full((4, 4), 7, np.int32), np.full((4, 4), 300, np.int32)
    out = decode_pages(tiff_bytes(low, high))
    assert {p.dtype for p in out} == {np.dtype(np.uint16)}
    assert out[0][0, 0, 0] == 7 and out[1][0, 0, 0] == 300


def test_pages_of_different_sizes_or_types_are_refused_by_number() -> None:
    a, b = em_crop(0, 0, 0, 40, 50), em_crop(1, 0, 0, 40, 45)
    with pytest.raises(ImageError, match="page 3 is 45x40 but page 1 is 50x40"):
        decode_pages(tiff_bytes(a, a, b))
    with pytest.raises(ImageError, match=r"page 2 has 1 channel.*uint16"):
        decode_pages(tiff_bytes(a, a.astype(np.uint16)))


def test_limits_count_all_pages_and_are_checked_before_decoding() -> None:
    page = em_crop(0, 0, 0, 40, 50)
    data = tiff_bytes(page, page, page)
    assert len(decode_pages(data, max_pixels=3 * 2000)) == 3
    with pytest.raises(ImageTooLargeError, match=r"first 3 pages .*\(all pages count\)"):
        decode_pages(data, max_pixels=3 * 2000 - 1)
    with pytest.raises(TooManyPagesError, match="more than the limit of 2 pages"):
        decode_pages(data, max_pages=2)


def test_a_header_claiming_a_million_pages_is_refused_at_once() -> None:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((3, 64, 80), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    honest = buf.getvalue()
    assert len(decode_pages(honest)) == 3
    lying = honest.replace(b"images=3\nslices=3", b"images=1000000\nslices=1000000")
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(TooManyPagesError, match="declares 1000000 pages"):
        decode_pages(lying)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * len(lying) + (1 << 20)  # nothing sized by the claim
    assert elapsed < 5  # a bound on work, not a speed target: no page is walked
    # A smaller lie (9 declared, 3 held) is a corrupt file, not a shorter stack.
    with pytest.raises(CorruptImageError, match="declares 9 pages but holds 3"):
        decode_pages(honest.replace(b"images=3\nslices=3", b"images=9\nslices=9"))


def test_a_real_chain_of_too_many_pages_is_walked_only_up_to_the_limit() -> None:
    tiny = np.zeros((1, 1), np.uint8)
    data = tiff_bytes(*[tiny] * 3000)
    tracemalloc.start()
    with pytest.raises(TooManyPagesError, match="limit of 100 pages"):
        decode_pages(data, max_pages=100)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20  # 101 page headers, not 3000


def test_truncated_and_looping_chains_are_corrupt_not_shorter() -> None:
    page = em_crop(0, 0, 0, 40, 50)
    data = tiff_bytes(page, page, page)
    offsets = ifd_offsets(data)
    for cut in (offsets[2], offsets[2] + 30, len(data) - 10):
        with pytest.raises(CorruptImageError, match="truncated or corrupt"):
            decode_pages(data[:cut])
    # Found from the bytes too, not only from what tifffile logs.
    quiet = logging.getLogger("tifffile")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with pytest.raises(CorruptImageError, match="after page 2"):
            decode_pages(data[: offsets[2]])
    finally:
        quiet.setLevel(level)
    looped = bytearray(data)
    entries = struct.unpack_from("<H", looped, offsets[2])[0]
    struct.pack_into("<I", looped, offsets[2] + 2 + 12 * entries, offsets[0])
    with pytest.raises(CorruptImageError, match="loops"):
        decode_pages(bytes(looped))


def test_hyperstacks_with_two_extra_axes_are_refused_clearly() -> None:
    for kw in ({"imagej": True}, {"ome": True}):
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros((2, 3, 8, 8), np.uint8), metadata={"axes": "TZYX"}, **kw)
        with pytest.raises(ImageError, match="hyperstack"):
            decode_pages(buf.getvalue())
    buf = io.BytesIO()  # a plain OME z-stack is a stack
    tifffile.imwrite(buf, np.zeros((4, 8, 8), np.uint8), ome=True, metadata={"axes": "ZYX"})
    assert len(decode_pages(buf.getvalue())) == 4


def test_volume_bytes_round_trip() -> None:
    pages = [em_crop(i, 0, 0, 20, 30) for i in range(3)]
    out = decode_pages(volume_bytes(pages))
    assert all(np.array_equal(o[..., 0], p) for o, p in zip(out, pages, strict=True))


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
