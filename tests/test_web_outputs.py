"""The web page's other outputs of a segmented file, in a real browser: "Colour each cell"
shows the progress of its request and retries a full queue (503) after the server's
Retry-After, without a script error; the download buttons say the format they save."""

from __future__ import annotations

import concurrent.futures
import io
from pathlib import Path

import numpy as np
from app_helpers import em_crop, gated, make_app, png_bytes, save_tiny, service_of, tiff_bytes
from browser import browser_page, live_server
from PIL import Image
from test_web_browser import WAIT_MS, api, expect, job, weights

__all__ = ["weights"]  # the fixture


def saved(page, control) -> tuple[str, bytes]:
    """The name and bytes a click on `control` downloads."""
    with page.expect_download() as info:
        control.click()
    return info.value.suggested_filename, Path(info.value.path()).read_bytes()


def test_colour_each_cell_shows_its_progress_and_retries_a_full_queue(weights: Path) -> None:
    app = make_app(weights, max_queue_tiles=8, max_batch_tiles=4)
    held = png_bytes(em_crop(0, 0, 0, 100, 100))  # 2 x 2 tiles of 60
    six = png_bytes(em_crop(1, 0, 0, 100, 150))  # 2 x 3 tiles: 4 + 6 > 8
    errors: list[str] = []
    with (
        live_server(app) as base,
        browser_page(base) as (page, log),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/")
        page.locator("#files").set_input_files(
            [{"name": "six.png", "mimeType": "image/png", "buffer": six}]
        )
        expect(job(page, "six.png").locator(".status")).to_contain_text(
            "Done: 150 × 100", timeout=WAIT_MS
        )
        downloads = page.get_by_role("group", name="Downloads")
        cells_button = downloads.get_by_role("button", name="Download cell instances")
        expect(cells_button).to_have_text("Download cell instances (PNG; TIFF beyond 65535 cells)")
        # Every text the cells' status shows, in order, however briefly.
        page.evaluate(
            """() => { window.shown = [];
                const status = document.getElementById('cells-status');
                new MutationObserver(() => window.shown.push(status.textContent))
                .observe(status, {subtree: true, childList: true, characterData: true}); }"""
        )
        with gated(service_of(app)) as gate:
            first = pool.submit(api, base, held, "held.png")
            assert gate.entered.wait(60)
            with page.expect_response(
                lambda r: "output=instances" in r.url and r.status == 503
            ) as refused:
                page.get_by_label("Colour each cell").check()
            wait = refused.value.headers["retry-after"]
            expect(page.locator("#cells-status")).to_contain_text(
                "The server is busy or not ready (503): the queue is full; retry later.",
                timeout=WAIT_MS,
            )
            expect(page.get_by_label("Colour each cell")).to_be_disabled()
        assert first.result().status_code == 200
        page.wait_for_selector("[data-panel=overlay][data-colouring=cells]", timeout=WAIT_MS)
        expect(page.locator("#cells-status")).to_have_text("")
        expect(page.get_by_label("Colour each cell")).to_be_enabled()
        shown = [s for s in page.evaluate("window.shown") if s]
        countdown = [s for s in shown if "Retrying in" in s]
        assert countdown and countdown[0].endswith(f"Retrying in {wait} s."), shown
        assert shown[-1] == "computing the cells…", shown
        # The cells shown are the API's instances of the same file.
        instances = api(base, six, "six.png", "instances").content
        labels = np.asarray(Image.open(io.BytesIO(instances)))
        tint = page.eval_on_selector(
            "canvas.tint",
            "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)",
        )
        alpha = np.array(tint, np.uint8).reshape(*labels.shape, 4)[..., 3]
        assert np.array_equal(alpha > 0, labels > 0)
        # Coloured by the server: the instances sent back to POST /v1/preview.
        assert sum("/v1/preview?" in u and "colour=instances" in u for u in log.urls) == 1
        # The instances are known now, and so is their format.
        expect(cells_button).to_have_text("Download cell instances (PNG)")
        name, data = saved(page, cells_button)
        assert name == "six_instances.png" and data == instances
        assert errors == [] and log.external() == []


def test_download_buttons_say_the_format_they_save(tmp_path: Path) -> None:
    """A stack's overlay and instances are multi-page TIFFs, and their buttons say so; one
    image's instances beyond 65535 cells come as a TIFF, which the answer's type tells."""
    pages = [em_crop(i, 0, 0, 96, 128) for i in range(2)]
    stack = tmp_path / "stack.tif"
    stack.write_bytes(tiff_bytes(*pages))
    with live_server(make_app(save_tiny(tmp_path))) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/")
        page.locator("#files").set_input_files([str(stack)])
        expect(job(page, stack.name).locator(".status")).to_contain_text(
            "2 pages (the first shown)", timeout=WAIT_MS
        )
        downloads = page.get_by_role("group", name="Downloads")
        expected = {
            "probabilities": (
                "Download probabilities (.npy, all pages)",
                "stack_probabilities.npy",
            ),
            "overlay": ("Download overlay (TIFF, all pages)", "stack_overlay.tif"),
            "instances": ("Download cell instances (TIFF, all pages)", "stack_instances.tif"),
        }
        for output, (label, filename) in expected.items():
            button = downloads.get_by_role("button", name=label, exact=True)
            name, data = saved(page, button)
            assert name == filename
            assert data == api(base, stack.read_bytes(), stack.name, output).content, output
            expect(button).to_have_text(label)
        formats = page.evaluate(
            """async () => {
                const { downloadFormat } = await import('/web/outputs.js');
                return [
                    downloadFormat('instances', 1, 'image/tiff'),
                    downloadFormat('instances', 1, 'image/png'),
                    downloadFormat('overlay', 1),
                    downloadFormat('mask', 3),
                ];
            }"""
        )
        assert formats == [
            {"extension": "tif", "format": "TIFF"},
            {"extension": "png", "format": "PNG"},
            {"extension": "png", "format": "PNG"},
            {"extension": "tif", "format": "TIFF, all pages"},
        ]
        assert log.external() == []
