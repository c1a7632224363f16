"""The web page at `/` in a real browser (Debian's headless Chromium): an ISBI slice goes
through the page to the API and back; the three views, the downloads, errors, the API key,
a 503 retried after its Retry-After, keyboard and pointer zoom and pan in step, an axe
accessibility check, and no request to anything but the server. (The views of every kind of
image, as the server renders them: tests/test_web_views.py.)"""

from __future__ import annotations

import concurrent.futures
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from app_helpers import em_crop, gated, make_app, png_bytes, save_tiny, service_of
from browser import browser_page, live_server
from PIL import Image

from conftest import ISBI
from unet_service.imaging.display import PALETTE, label_colours

expect = pytest.importorskip("playwright.sync_api").expect
Axe = pytest.importorskip("axe_playwright_python.sync_playwright").Axe

SLICE = ISBI / "train" / "image" / "00.png"
WAIT_MS = 120_000  # a generous bound for two shared CPU cores; every wait ends on an event
KEY = "s3cret"


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    if not SLICE.is_file():
        pytest.skip(f"ISBI data not found at {ISBI}")
    return save_tiny(tmp_path)


def job(page, name: str):
    """The list entry of an uploaded file."""
    return page.locator("li.job").filter(has=page.get_by_text(name, exact=True))


def download(page, control) -> bytes:
    with page.expect_download() as info:
        control.click()
    return Path(info.value.path()).read_bytes()


def pixels(page, selector: str) -> np.ndarray:
    """A canvas's RGBA pixels, (H, W, 4)."""
    got = page.eval_on_selector(
        selector,
        """c => ({w: c.width, h: c.height,
                  d: Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)})""",
    )
    return np.array(got["d"], np.uint8).reshape(got["h"], got["w"], 4)


def moved_in_step(page, before: str) -> str:
    """Waits until the view has moved from `before`; all three views show the same part."""
    page.wait_for_function(
        "before => document.querySelector('.stage').style.transform !== before", arg=before
    )
    now = page.eval_on_selector_all(".stage", "stages => stages.map(s => s.style.transform)")
    assert len(now) == 3 and len(set(now)) == 1, now
    return now[0]


def api(base: str, data: bytes, name: str, output: str = "mask", key: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{base}/v1/segment?output={output}"
    return httpx.post(url, files={"file": (name, data)}, headers=headers, timeout=60)


def assert_accessible(page) -> None:
    results = Axe().run(page)
    assert results.violations_count == 0, results.generate_report()


def test_slice_is_segmented_shown_and_downloaded_as_the_api_answers(
    weights: Path, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    with live_server(make_app(weights)) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/")
        expect(page.locator("#model")).to_contain_text("tiny", timeout=WAIT_MS)
        expect(page.locator("#server-state")).to_have_text("Ready", timeout=WAIT_MS)
        page.locator("#files").set_input_files([str(SLICE), str(notes)])

        status = job(page, SLICE.name).locator(".status")
        expect(status).to_contain_text("Done: 512 × 512 pixels", timeout=WAIT_MS)
        expect(page.locator("#result-name")).to_have_text(SLICE.name)
        mask_png = api(base, SLICE.read_bytes(), SLICE.name).content
        mask = np.asarray(Image.open(io.BytesIO(mask_png)))
        assert 0 < (mask > 0).mean() < 1
        # The views: the slice, the mask's tint over the slice, the mask alone.
        image = pixels(page, "[data-panel=image] canvas")
        assert np.array_equal(image[..., 0], np.asarray(Image.open(SLICE)))
        assert np.array_equal(pixels(page, "[data-panel=overlay] canvas:not(.tint)"), image)
        tint = pixels(page, "[data-panel=overlay] canvas.tint")
        assert np.array_equal(tint[..., 3] > 0, mask > 0)
        assert np.array_equal(pixels(page, "[data-panel=mask] canvas")[..., 0], mask)
        page.get_by_label("Overlay opacity").fill("80")
        assert page.eval_on_selector("canvas.tint", "c => c.style.opacity") == "0.8"

        # The downloads are the API's answers for the same file.
        downloads = page.get_by_role("group", name="Downloads")
        got = download(page, downloads.get_by_role("link", name="Download mask (PNG)"))
        assert got == mask_png
        for output, label in [
            ("probabilities", "probabilities (.npy)"),
            ("overlay", "overlay"),
            ("instances", "cell instances"),
        ]:
            got = download(page, downloads.get_by_role("button", name=f"Download {label}"))
            assert got == api(base, SLICE.read_bytes(), SLICE.name, output).content, output
            if output == "probabilities":
                assert np.load(io.BytesIO(got)).shape == (512, 512)

        # "Colour each cell": the overlay's tint becomes the API's cell instances, each cell
        # in the colour the server's instance overlay gives it (the server renders them);
        # the view stays where it was.
        labels = np.asarray(
            Image.open(io.BytesIO(api(base, SLICE.read_bytes(), SLICE.name, "instances").content))
        )
        page.get_by_label("Colour each cell").check()
        page.wait_for_selector("[data-panel=overlay][data-colouring=cells]")
        tint = pixels(page, "canvas.tint").astype(int)
        cells = labels > 0
        assert (tint[~cells][:, 3] == 0).all() and (tint[cells][:, 3] == 255).all()
        expected = label_colours(labels).astype(int)
        assert np.array_equal(tint[cells][:, :3], expected[cells])
        page.get_by_label("Colour each cell").uncheck()
        page.wait_for_selector("[data-panel=overlay][data-colouring=classes]")

        # The invalid file shows the API's own error, in words.
        refused = api(base, notes.read_bytes(), notes.name)
        assert refused.status_code == 415
        status = job(page, notes.name).locator(".status")
        expect(status).to_contain_text(refused.json()["error"], timeout=WAIT_MS)
        expect(status).to_contain_text("Not an image in a format the server reads (415)")

        # Zoom and pan stay in step: keyboard, wheel, drag, Fit.
        view = page.eval_on_selector(".stage", "s => s.style.transform")
        page.get_by_role("group", name="Mask over the image").focus()
        page.keyboard.press("+")
        view = moved_in_step(page, view)
        page.keyboard.press("ArrowRight")
        view = moved_in_step(page, view)
        box = page.get_by_role("group", name="Mask", exact=True).bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + 50, box["y"] + 60)
        page.mouse.wheel(0, -200)
        view = moved_in_step(page, view)
        page.mouse.down()
        page.mouse.move(box["x"] + 90, box["y"] + 100)
        page.mouse.up()
        view = moved_in_step(page, view)
        page.get_by_role("button", name="Fit").click()
        moved_in_step(page, view)

        assert_accessible(page)
        assert log.external() == []


def test_api_key_and_refused_uploads_read_as_the_apis_errors(weights: Path) -> None:
    small = png_bytes(em_crop(1, 0, 0, 64, 64))
    files = {
        "big.png": png_bytes(em_crop(1, 0, 0, 120, 120)),  # over UNET_MAX_PIXELS: 413
        "empty.png": b"",  # 422
        "cut.png": small[: len(small) // 2],  # truncated: 422
        "notes.txt": b"not an image\n",  # 415
        "huge.tif": b"II*\x00" + bytes(1536 * 1024),  # over UNET_MAX_UPLOAD_MB: 413
    }
    app = make_app(weights, api_key=KEY, max_pixels=100 * 100, max_upload_mb=1)
    with live_server(app) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/")
        # Without the key: the card and an upload say what is missing.
        expect(page.locator("#model")).to_contain_text("needs an API key", timeout=WAIT_MS)
        page.locator("#files").set_input_files(
            [{"name": "small.png", "mimeType": "image/png", "buffer": small}]
        )
        expect(job(page, "small.png").locator(".status")).to_contain_text(
            "The server needs an API key: enter it under “API key” at the top (401)",
            timeout=WAIT_MS,
        )
        key = page.get_by_label("API key")
        key.fill(KEY)
        key.press("Enter")  # change: the card is loaded again, now with the key
        page.keyboard.press("Tab")
        expect(page.locator("#model")).to_contain_text("tiny", timeout=WAIT_MS)
        assert page.evaluate("sessionStorage.getItem('unet-api-key')") == KEY
        page.get_by_role("button", name="Try small.png again").click()
        expect(job(page, "small.png").locator(".status")).to_contain_text(
            "Done: 64 × 64", timeout=WAIT_MS
        )

        page.locator("#files").set_input_files(
            [
                {"name": name, "mimeType": "application/octet-stream", "buffer": data}
                for name, data in files.items()
            ]
        )
        for name, data in files.items():
            answer = api(base, data, name, key=KEY)
            assert answer.status_code in (413, 415, 422), name
            status = job(page, name).locator(".status")
            expect(status).to_contain_text(
                f"({answer.status_code}): {answer.json()['error']}", timeout=WAIT_MS
            )
        assert_accessible(page)
        assert log.external() == []


def test_a_full_queue_is_retried_after_the_servers_retry_after(weights: Path) -> None:
    app = make_app(weights, max_queue_tiles=8, max_batch_tiles=4)
    held = png_bytes(em_crop(0, 0, 0, 100, 100))  # 2 x 2 tiles of 60
    six = png_bytes(em_crop(1, 0, 0, 100, 150))  # 2 x 3 tiles: 4 + 6 > 8
    with (
        live_server(app) as base,
        browser_page(base) as (page, log),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        page.goto(f"{base}/")
        expect(page.locator("#server-state")).to_have_text("Ready", timeout=WAIT_MS)
        # Every text the entry shows, in order, however briefly.
        page.evaluate(
            """() => { window.shown = [];
                new MutationObserver(() => document.querySelectorAll('li.job .status')
                    .forEach(s => window.shown.push(s.textContent)))
                .observe(document.getElementById('jobs'),
                         {subtree: true, childList: true, characterData: true}); }"""
        )
        with gated(service_of(app)) as gate:
            first = pool.submit(api, base, held, "held.png")
            assert gate.entered.wait(60)
            with page.expect_response(
                lambda r: "/v1/segment" in r.url and r.status == 503
            ) as refused:
                page.locator("#files").set_input_files(
                    [{"name": "six.png", "mimeType": "image/png", "buffer": six}]
                )
            wait = refused.value.headers["retry-after"]
            status = job(page, "six.png").locator(".status")
            expect(status).to_contain_text(
                "The server is busy or not ready (503): the queue is full; retry later.",
                timeout=WAIT_MS,
            )
        assert first.result().status_code == 200
        expect(status).to_contain_text("Done: 150 × 100", timeout=WAIT_MS)
        shown = page.evaluate("window.shown")
        countdown = [s for s in shown if "Retrying in" in s]
        assert countdown and countdown[0].endswith(f"Retrying in {wait} s."), countdown
        # The progress shown: upload, computing, the countdown, and again up to the result.
        steps = ["retry" if "Retrying in" in s else s.split(" ")[0] for s in shown]
        steps = [a for a, b in zip(steps, [None, *steps[:-1]], strict=True) if a != b]
        assert steps[:4] == ["Waiting", "Uploading", "Computing…", "retry"], steps
        assert steps[-3:] == ["Uploading", "Computing…", "Done:"], steps
        assert log.external() == []


def test_several_classes_are_shown_in_the_overlays_colours(tmp_path: Path) -> None:
    if not SLICE.is_file():
        pytest.skip(f"ISBI data not found at {ISBI}")
    weights = save_tiny(tmp_path, out_channels=3)
    crop = png_bytes(em_crop(3, 0, 0, 80, 96))
    with live_server(make_app(weights)) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/")
        expect(page.locator("#model")).to_contain_text("class0, class1, class2", timeout=WAIT_MS)
        page.locator("#files").set_input_files(
            [{"name": "crop.png", "mimeType": "image/png", "buffer": crop}]
        )
        expect(job(page, "crop.png").locator(".status")).to_contain_text(
            "Done: 96 × 80", timeout=WAIT_MS
        )
        mask = np.asarray(Image.open(io.BytesIO(api(base, crop, "crop.png").content)))
        assert len(np.unique(mask)) > 1
        colours = np.concatenate([[[0, 0, 0]], PALETTE[:2]]).astype(np.uint8)
        assert np.array_equal(pixels(page, "[data-panel=mask] canvas")[..., :3], colours[mask])
        tint = pixels(page, "[data-panel=overlay] canvas.tint")
        assert np.array_equal(tint[..., 3] > 0, mask > 0)
        assert np.array_equal(tint[mask > 0][:, :3], colours[mask][mask > 0])
        expect(page.locator("#legend")).to_have_text("class1 class2")
        expect(page.locator("#mask-legend")).to_have_text("colours as in the overlay")
        assert log.external() == []
