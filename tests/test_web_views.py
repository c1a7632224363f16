"""The page's views in a real browser are the server's renderings (POST /v1/preview): the
page decodes no image format itself. Every kind of upload (TIFF of each layout, compression and
pixel type, 16-bit PNG, a stack) is shown as the server shows it, which is the overlay's
rendering of the pixels the server segments (8-bit as is, 16-bit and float stretched); an
image larger than the views is shown scaled down, its downloads full size."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import tifffile
from app_helpers import em_crop, make_app, to_uint16
from browser import browser_page, live_server
from PIL import Image
from test_web_browser import WAIT_MS, api, download, expect, job, pixels, weights

from unet_service.imaging.display import PALETTE
from unet_service.imaging.encode import overlay_png
from unet_service.imaging.pages import decode_pages

__all__ = ["weights"]  # the fixture

VIEW_SIDE = 4096  # render.js: the longest side of the views


def preview(base: str, data: bytes, **params: object) -> np.ndarray:
    """The server's rendering of `data` for the page's views, as (H, W, 3) or (H, W, 4)."""
    r = httpx.post(
        f"{base}/v1/preview",
        params={"max_side": VIEW_SIDE, **params},
        files={"file": ("file", data)},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(r.content))
    return np.asarray(image.convert("RGBA" if image.mode == "RGBA" else "RGB"))


def overlay_view(page: np.ndarray) -> np.ndarray:
    """The overlay's RGB picture of a decoded (H, W, C) page with nothing tinted."""
    blank = np.zeros(page.shape[:2], np.uint8)
    return np.asarray(Image.open(io.BytesIO(overlay_png(page, blank)))).astype(int)


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG, grey (H, W) or RGB (H, W, 3), whose rows cycle through all five PNG
    filters (encoders pick them by content, so a plain save may never use some)."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.astype(">u2").reshape(height, -1).view(np.uint8).astype(np.int32)
    bpp = 2 * channels
    raw = bytearray()
    for y, row in enumerate(rows):
        kind = y % 5
        up = rows[y - 1] if y else np.zeros_like(row)
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        corner = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        if kind == 4:
            p = left + up - corner
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - corner)
            predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, corner))
        else:
            predicted = [0 * row, left, up, (left + up) // 2][kind]
        raw += bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = struct.pack(">IIBBBBB", width, height, 16, 0 if channels == 1 else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )


def pillow_tiff(pixels: np.ndarray, compression: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="TIFF", compression=compression)
    return buf.getvalue()


def tifffile_tiff(*pages: np.ndarray, **options: object) -> bytes:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf, byteorder=options.pop("byteorder", "<")) as tif:
        for page in pages:
            tif.write(page, **options)
    return buf.getvalue()


def preview_cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file, the pixels the server reads from it: its first page)."""
    em = em_crop(2, 10, 20, 150, 170)
    em16 = to_uint16(em)
    rgb = np.stack([em, em[::-1], em[:, ::-1]], axis=-1)
    narrow = (em16 // 16 + 1000).astype(np.uint16)  # a narrow part of the 16-bit range
    floats = em.astype(np.float32) / 300
    return {
        "u16.tif": (tifffile_tiff(em16), em16),
        "u16-deflate-predictor.tif": (
            tifffile_tiff(em16, compression="zlib", predictor=True),
            em16,
        ),
        "u16-big-endian.tif": (tifffile_tiff(narrow, byteorder=">"), narrow),
        "u16-lzw.tif": (pillow_tiff(em16, "tiff_lzw"), em16),
        "u8-lzw.tif": (pillow_tiff(em, "tiff_lzw"), em),
        "u8-packbits.tif": (pillow_tiff(em, "packbits"), em),
        "f32-tiles.tif": (tifffile_tiff(floats, tile=(32, 48)), floats),
        "rgb-planar.tif": (
            tifffile_tiff(rgb.transpose(2, 0, 1), planarconfig="separate", photometric="rgb"),
            rgb,
        ),
        "stack.tif": (tifffile_tiff(em16, em16[::-1]), em16),
        "u16.png": (png16(narrow), narrow),
        # Pillow, the server's PNG decoder, reads 16-bit RGB as its high bytes (8-bit, shown
        # as is): the page shows the pixels the server segments.
        "rgb16.png": (png16(to_uint16(rgb)), (to_uint16(rgb) >> 8).astype(np.uint8)),
    }


def test_every_kind_of_image_is_shown_as_the_server_renders_it(weights: Path) -> None:
    cases = preview_cases()
    with live_server(make_app(weights)) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/")
        page.locator("#files").set_input_files(
            [
                {"name": name, "mimeType": "application/octet-stream", "buffer": data}
                for name, (data, _) in cases.items()
            ]
        )
        for name in cases:
            status = job(page, name).locator(".status")
            expect(status).to_contain_text("Done:", timeout=WAIT_MS)
        for name, (data, source) in cases.items():
            page.get_by_role("button", name=f"Show {name}", exact=True).click()
            expect(page.locator("#result-name")).to_have_text(name)
            shown = pixels(page, "[data-panel=image] canvas")
            assert (shown[..., 3] == 255).all(), name
            # The server's rendering, pixel for pixel...
            served = preview(base, data)
            assert np.array_equal(shown[..., :3], served), name
            # ...which is the overlay's picture of the first page the server decoded...
            first = decode_pages(data)[0]
            assert np.array_equal(served, overlay_view(first)), name
            # ...and of the pixels the file holds (float32 arithmetic in the service).
            image = source if source.ndim == 3 else source[:, :, None]
            difference = np.abs(served - overlay_view(image)).max()
            assert difference <= 1, (name, difference)
        previews = [u for u in log.urls if "/v1/preview?" in u]
        assert len(previews) == 2 * len(cases)  # each file's image, and its mask's tint
        assert log.external() == []


def test_an_image_larger_than_the_views_is_shown_scaled_down(weights: Path) -> None:
    """4200 x 60 pixels: the views are 4096 x 59 (the server's area average for the image,
    its labels under each pixel's centre for the mask), the zoom counts original pixels, and
    the downloads are the full-size answers."""
    wide = np.concatenate([em_crop(i, 0, 0, 60, 512) for i in range(9)], axis=1)[:, :4200]
    data = tifffile_tiff(to_uint16(wide))
    with live_server(make_app(weights)) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/")
        page.locator("#files").set_input_files(
            [{"name": "wide.tif", "mimeType": "image/tiff", "buffer": data}]
        )
        status = job(page, "wide.tif").locator(".status")
        expect(status).to_contain_text("Done: 4200 × 60 pixels", timeout=WAIT_MS)
        image = pixels(page, "[data-panel=image] canvas")
        assert image.shape == (59, 4096, 4)
        assert np.array_equal(image[..., :3], preview(base, data))
        answer = api(base, data, "wide.tif").content
        mask = np.asarray(Image.open(io.BytesIO(answer)))
        assert mask.shape == (60, 4200) and 0 < (mask > 0).mean() < 1
        rows = ((np.arange(59) + 0.5) * 60 / 59).astype(int)
        cols = ((np.arange(4096) + 0.5) * 4200 / 4096).astype(int)
        sampled = mask[rows[:, None], cols[None, :]]
        assert np.array_equal(pixels(page, "[data-panel=mask] canvas")[..., 0], sampled)
        tint = pixels(page, "[data-panel=overlay] canvas.tint")
        assert np.array_equal(tint[..., 3] > 0, sampled > 0)
        assert (tint[sampled > 0][:, :3] == PALETTE[0]).all()
        page.get_by_role("group", name="Mask", exact=True).focus()
        page.keyboard.press("0")
        fit = page.eval_on_selector(".stage", "s => s.style.transform")
        scale = float(fit.split("scale(")[1].rstrip(")"))
        zoom = round(scale / (4200 / 4096) * 100)  # the view's pixel is 4200 / 4096 originals
        expect(page.locator("#zoom-level")).to_have_text(f"Zoom {zoom}%")
        downloads = page.get_by_role("group", name="Downloads")
        got = download(page, downloads.get_by_role("link", name="Download mask (PNG)"))
        assert got == answer
        assert log.external() == []
