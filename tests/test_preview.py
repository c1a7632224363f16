"""`POST /v1/preview`: an upload as the web page shows it. Its pixels are the decoded page
stretched as the overlay stretches it (8-bit as is, 16-bit and float from min to max), grey or
RGB, page N of a stack, scaled down by area averaging; /v1/segment's limits and error answers;
the API key; and it never goes through the tile queue. (Masks and instances rendered in the
overlay's colours: tests/test_preview_labels.py.)"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from app_helpers import (
    em_crop,
    gated,
    make_app,
    metric,
    png_bytes,
    running,
    save_tiny,
    service_of,
    tiff_bytes,
    to_uint16,
)
from PIL import Image
from test_app_errors import assert_json_error, wait_until

from unet_service.imaging.encode import overlay_png
from unet_service.imaging.pages import decode_pages

pytestmark = pytest.mark.anyio


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path)


def upload(data: bytes, name: str = "image") -> dict:
    return {"file": (name, data, "application/octet-stream")}


def png_pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def overlay_view(page: np.ndarray) -> np.ndarray:
    """The overlay's picture of a decoded (H, W, C) page with nothing tinted: what the
    preview must equal, grey or RGB."""
    rgb = png_pixels(overlay_png(page, np.zeros(page.shape[:2], np.uint8)))
    return rgb[:, :, 0] if page.shape[2] == 1 else rgb


def uint16_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # mode I;16: a 16-bit grey PNG
    return buf.getvalue()


def cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (upload, the stretch computed here from its pixels, (H, W) or (H, W, 3))."""
    em = em_crop(2, 10, 20, 90, 110)
    narrow = (to_uint16(em) // 16 + 1000).astype(np.uint16)  # a narrow part of the range
    floats = em.astype(np.float32) / 300 + 0.1
    rgb = np.stack([em, em[::-1], em[:, ::-1]], axis=-1)
    rgb16 = to_uint16(rgb)

    def stretch(pixels: np.ndarray) -> np.ndarray:
        lo, hi = float(pixels.min()), float(pixels.max())
        return np.rint((pixels.astype(np.float64) - lo) * 255 / (hi - lo)).astype(np.uint8)

    return {
        "u8.png": (png_bytes(em), em),
        "u8.tif": (tiff_bytes(em), em),
        "u16.png": (uint16_png(narrow), stretch(narrow)),
        "u16.tif": (tiff_bytes(narrow), stretch(narrow)),
        "f32.tif": (tiff_bytes(floats), stretch(floats)),
        "rgb.png": (png_bytes(rgb), rgb),
        "rgb16.tif": (tiff_bytes(rgb16), stretch(rgb16)),
    }


async def test_preview_is_the_decoded_page_stretched_as_the_overlay(weights: Path) -> None:
    async with running(make_app(weights)) as client:
        for name, (data, stretched) in cases().items():
            r = await client.post("/v1/preview", files=upload(data, name))
            assert r.status_code == 200, (name, r.text)
            assert r.headers["content-type"] == "image/png"
            height, width = stretched.shape[:2]
            assert r.headers["x-image-width"] == str(width)
            assert r.headers["x-image-height"] == str(height)
            assert (r.headers["x-pages"], r.headers["x-page"]) == ("1", "1")
            image = Image.open(io.BytesIO(r.content))
            assert image.mode == ("L" if stretched.ndim == 2 else "RGB"), name
            shown = np.asarray(image)
            # Exactly the overlay's stretch of the same decoder's pixels...
            (page,) = decode_pages(data)
            assert np.array_equal(shown, overlay_view(page)), name
            # ...which is min to max for 16-bit and float, 8-bit as is (float32 arithmetic
            # in the service: a value on a .5 boundary may round either way).
            assert np.abs(shown.astype(int) - stretched).max() <= 1, name
            if stretched.dtype == np.uint8 and name.startswith(("u8", "rgb.")):
                assert np.array_equal(shown, stretched), name


async def test_page_n_of_a_stack_and_pages_out_of_range(weights: Path) -> None:
    pages = [to_uint16(em_crop(i, 0, 0, 64, 80)) // (i + 1) for i in range(3)]
    stack = tiff_bytes(*pages)
    async with running(make_app(weights)) as client:
        for number, page in enumerate(decode_pages(stack), start=1):
            r = await client.post("/v1/preview", params={"page": number}, files=upload(stack))
            assert r.status_code == 200, r.text
            assert (r.headers["x-pages"], r.headers["x-page"]) == ("3", str(number))
            # Each page stretched on its own, as the stack's overlay pages are.
            assert np.array_equal(png_pixels(r.content), overlay_view(page)), number
        r = await client.post("/v1/preview", params={"page": 4}, files=upload(stack))
        assert_json_error(r, 422, "page 4", "3 pages")
        r = await client.post("/v1/preview", params={"page": 2}, files=upload(png_bytes(pages[0])))
        assert_json_error(r, 422, "page 2", "1 page")
        for bad in ("0", "-1", "two"):
            r = await client.post("/v1/preview", params={"page": bad}, files=upload(stack))
            assert_json_error(r, 422, "page")


async def test_large_pages_are_scaled_down_by_area_averaging(weights: Path) -> None:
    em = em_crop(4, 0, 0, 160, 120)
    big16 = to_uint16(em)
    async with running(make_app(weights)) as client:

        async def shown(data: bytes, **params: object) -> np.ndarray:
            r = await client.post("/v1/preview", params=params, files=upload(data))
            assert r.status_code == 200, r.text
            assert (r.headers["x-image-width"], r.headers["x-image-height"]) == ("120", "160")
            return png_pixels(r.content)

        # A factor of 4: each pixel is the mean of the 4 x 4 stretched pixels it covers
        # (within 1: Pillow averages rows, then columns, rounding after each pass).
        full = await shown(tiff_bytes(big16))
        small = await shown(tiff_bytes(big16), max_side=40)
        assert small.shape == (40, 30)
        means = full.reshape(40, 4, 30, 4).astype(np.float64).mean(axis=(1, 3))
        assert np.abs(small - means).max() <= 1
        assert np.abs(small - means).mean() < 0.5
        # Any other size: the longer side is max_side, the shape kept (rounded).
        odd = await shown(png_bytes(em), max_side=100)
        assert odd.shape == (100, 75)
        assert abs(odd.astype(float).mean() - em.mean()) < 1
        # Never scaled up; the default keeps pages up to 2048 on a side whole.
        assert np.array_equal(await shown(png_bytes(em), max_side=8192), em)
        assert np.array_equal(await shown(png_bytes(em)), em)
        for bad in (15, 8193, "big"):
            r = await client.post(
                "/v1/preview", params={"max_side": bad}, files=upload(png_bytes(em))
            )
            assert_json_error(r, 422, "max_side")


async def test_bad_uploads_get_the_same_answers_as_segment(weights: Path) -> None:
    small = png_bytes(em_crop(1, 0, 0, 64, 64))
    uploads = {
        "big.png": png_bytes(em_crop(1, 0, 0, 120, 120)),  # over UNET_MAX_PIXELS: 413
        "stack.tif": tiff_bytes(*[em_crop(i, 0, 0, 20, 20) for i in range(4)]),  # > 3 pages
        "empty.png": b"",
        "cut.png": small[: len(small) // 2],
        "notes.txt": b"not an image\n",
        "huge.tif": b"II*\x00" + bytes(1536 * 1024),  # over UNET_MAX_UPLOAD_MB: 413
        "nan.tif": tiff_bytes(np.full((8, 8), np.nan, np.float32)),
    }
    app = make_app(weights, max_pixels=100 * 100, max_pages=3, max_upload_mb=1)
    async with running(app) as client:
        for name, data in uploads.items():
            segment = await client.post("/v1/segment", files=upload(data, name))
            preview = await client.post("/v1/preview", files=upload(data, name))
            assert segment.status_code in (413, 415, 422), name
            assert_json_error(preview, segment.status_code)
            assert preview.json() == segment.json(), name
        r = await client.post("/v1/preview", files={"image": ("a.png", small)})
        assert_json_error(r, 422, "field named 'file'")
        r = await client.post("/v1/preview", content=small, headers={"content-type": "text/plain"})
        assert_json_error(r, 415, "Content-Type")
        raw = await client.post("/v1/preview", content=small, headers={"content-type": "image/png"})
        assert raw.status_code == 200 and png_pixels(raw.content).shape == (64, 64)


async def test_the_api_key_guards_the_preview(weights: Path) -> None:
    files = upload(png_bytes(em_crop(8, 0, 0, 30, 30)))
    async with running(make_app(weights, api_key="s3cret")) as client:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = await client.post("/v1/preview", files=files, headers=headers)
            assert_json_error(r, 401, "API key")
            assert r.headers["www-authenticate"].startswith("Bearer")
        right = {"Authorization": "Bearer s3cret"}
        r = await client.post("/v1/preview", files=files, headers=right)
        assert r.status_code == 200 and png_pixels(r.content).shape == (30, 30)


async def test_the_preview_never_waits_for_the_tile_queue(weights: Path) -> None:
    app = make_app(weights, max_queue_tiles=8, max_batch_tiles=4)
    four = png_bytes(em_crop(0, 0, 0, 100, 100))  # 2 x 2 tiles of 60
    stack = tiff_bytes(em_crop(1, 0, 0, 100, 100), em_crop(2, 0, 0, 100, 100))  # 4 + 8 > 8
    async with running(app) as client:
        service = service_of(app)
        with gated(service) as gate:
            held = asyncio.ensure_future(client.post("/v1/segment", files=upload(four)))
            await wait_until(lambda: service.batcher.queued_tiles == 4 and gate.entered.is_set())
            tiles = await metric(client, "unet_tiles_total")
            # The worker is held and the queue full: a segmentation is refused at once...
            r = await client.post("/v1/segment", files=upload(stack))
            assert_json_error(r, 503, "queue is full")
            # ...while previews are answered, the worker still held inside its batch.
            for page in (1, 2):
                r = await client.post("/v1/preview", params={"page": page}, files=upload(stack))
                assert r.status_code == 200, r.text
            assert not gate.release.is_set() and gate.calls == 1
            assert service.batcher.queued_tiles == 4 and service.batcher.queued_images == 1
            assert await metric(client, "unet_tiles_total") == tiles
        assert (await held).status_code == 200


async def test_the_preview_is_documented_in_the_openapi(weights: Path) -> None:
    async with running(make_app(weights)) as client:
        spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/v1/preview"]["post"]
    assert operation["summary"] == "Render an image for display"
    assert "tile queue" in operation["description"]
    assert {"200", "401", "413", "415", "422", "503"} <= set(operation["responses"])
    assert set(operation["responses"]["200"]["content"]) == {"image/png"}
    headers = operation["responses"]["200"]["headers"]
    assert {"X-Image-Width", "X-Image-Height", "X-Pages", "X-Page"} <= set(headers)
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["file"]["format"] == "binary"
    params = {p["name"]: p for p in operation["parameters"]}
    assert set(params) == {"page", "max_side", "colour", "model"}
    assert params["max_side"]["schema"]["maximum"] == 8192
