"""The web page with a stack (multi-page TIFF): it shows the first page and its mask, as the
server renders them (POST /v1/preview of the stack and of its mask's TIFF, page 1), says how
many pages there are, and downloads the API's multi-page answer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from app_helpers import em_crop, make_app, save_tiny, tiff_bytes
from browser import browser_page, live_server
from test_web_browser import WAIT_MS, api, download, expect, job, pixels

from conftest import read_volume


def test_a_stack_shows_its_first_page_and_downloads_every_page(tmp_path: Path) -> None:
    pages = [em_crop(i, 0, 0, 96, 128) for i in range(3)]
    stack = tmp_path / "stack.tif"
    stack.write_bytes(tiff_bytes(*pages))
    with live_server(make_app(save_tiny(tmp_path))) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/")
        expect(page.locator("#server-state")).to_have_text("Ready", timeout=WAIT_MS)
        expect(page.locator("#model-name")).to_have_text(
            "tiny", timeout=WAIT_MS
        )  # the model it is sent to
        page.locator("#files").set_input_files([str(stack)])
        status = job(page, stack.name).locator(".status")
        expect(status).to_contain_text("3 pages (the first shown)", timeout=WAIT_MS)
        answer = api(base, stack.read_bytes(), stack.name).content
        with tifffile.TiffFile(io.BytesIO(answer)) as tif:
            masks = [p.asarray() for p in tif.pages]
        assert len(masks) == 3 and 0 < (masks[0] > 0).mean() < 1
        # One ImageJ volume (compressed strips, a description), which the browser cannot
        # read: the server renders its page 1 for the page.
        assert np.array_equal(read_volume(answer), np.stack(masks))
        previews = sorted(u.split("?")[1] for u in log.urls if "/v1/preview?" in u)
        assert previews == [
            "page=1&max_side=4096&colour=classes&model=tiny",
            "page=1&max_side=4096&model=tiny",
        ]
        image = pixels(page, "[data-panel=image] canvas")
        assert np.array_equal(image[..., 0], pages[0])
        assert np.array_equal(pixels(page, "[data-panel=mask] canvas")[..., 0], masks[0])
        tint = pixels(page, "[data-panel=overlay] canvas.tint")
        assert np.array_equal(tint[..., 3] > 0, masks[0] > 0)
        downloads = page.get_by_role("group", name="Downloads")
        link = downloads.get_by_role("link", name="Download mask (TIFF, all pages)")
        assert download(page, link) == answer
        assert log.external() == []
