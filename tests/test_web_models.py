"""The web page's model picker in a real browser (Debian's headless Chromium), on a server
with a repository of models: the picker lists every model with its state (one that failed to
load cannot be chosen, and says why), the default one chosen; choosing another shows its card
and sends the page's segmentation, previews and jobs to it (`?model=NAME`), its result
equal to the API's answer from that model, with the downloads that model offers. With one
model, the page shows its name and no picker."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from app_helpers import em_crop, make_app, metric_total, png_bytes, save_tiny
from browser import browser_page, live_server
from PIL import Image
from test_web_browser import SLICE, WAIT_MS, assert_accessible, download, expect, job, weights
from test_web_jobs import jobs, slice_tiff

from conftest import ISBI

__all__ = ["weights"]  # the fixture

ONE, THREE = "membranes", "organelles"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-class model (the default), a three-class one and a broken one."""
    if not SLICE.is_file():
        pytest.skip(f"ISBI data not found at {ISBI}")
    folder = tmp_path_factory.mktemp("models")
    save_tiny(folder, name=ONE, seed=1)
    save_tiny(folder, out_channels=3, name=THREE, seed=3)
    broken = save_tiny(folder, name="broken", seed=4)
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    return folder


def segment(base: str, data: bytes, model: str, output: str = "mask") -> bytes:
    url = f"{base}/v1/segment"
    params = {"model": model, "output": output}
    r = httpx.post(url, params=params, files={"file": ("crop.png", data)}, timeout=60)
    assert r.status_code == 200, r.text
    return r.content


def tiles(base: str, model: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return metric_total(text, "unet_tiles_total", model=model)


def test_the_chosen_model_shows_its_card_and_runs_the_pages_requests(
    repository: Path, tmp_path: Path
) -> None:
    app = make_app(
        repository / f"{ONE}.safetensors",
        models=repository,
        default_model=ONE,
        max_pixels=100 * 100,  # a slice (512 x 512) goes to a job
        jobs_dir=tmp_path / "jobs",
        job_progress_s=0.02,
    )
    crop = png_bytes(em_crop(3, 0, 0, 80, 96))
    tiff = slice_tiff(tmp_path, 0)
    with live_server(app) as base, browser_page(base) as (page, log):
        failed = httpx.post(f"{base}/v2/repository/models/broken/load", timeout=30)
        assert failed.status_code == 503
        listing = httpx.get(f"{base}/v1/models", timeout=30).json()
        (reason,) = [m["reason"] for m in listing["models"] if m["name"] == "broken"]
        page.goto(f"{base}/")
        picker = page.get_by_label("Name", exact=True)
        expect(picker).to_have_value(ONE, timeout=WAIT_MS)
        options = picker.locator("option")
        expect(options).to_have_text(
            [
                "broken: failed to load",
                f"{ONE} (default): ready",
                f"{THREE}: not loaded",
            ]
        )
        assert options.evaluate_all("os => os.map(o => o.disabled)") == [True, False, False]
        expect(page.locator("#model-choice .notes")).to_have_text(
            f"broken failed to load: {reason}"
        )
        card = page.locator("#model-card")
        expect(card).to_contain_text("Classesclass0Threshold")
        expect(page.locator("#legend")).to_have_text("class0")

        # Another model: its card, its legends, and the page's requests name it.
        picker.select_option(THREE)
        expect(card).to_contain_text("class0, class1, class2")
        expect(card).to_contain_text("arg-max over the classes")
        expect(page.locator("#legend")).to_have_text("class1 class2")
        before = tiles(base, THREE)
        with page.expect_request(lambda r: "/v1/segment" in r.url) as sent:
            page.locator("#files").set_input_files(
                [{"name": "crop.png", "mimeType": "image/png", "buffer": crop}]
            )
        assert f"model={THREE}" in sent.value.url
        entry = job(page, "crop.png")
        expect(entry.locator(".status")).to_contain_text("Done: 96 × 80", timeout=WAIT_MS)
        expect(entry.locator(".model")).to_have_text(f"Model: {THREE}")
        expect(page.locator("#result-model")).to_have_text(f"model {THREE}")
        assert tiles(base, THREE) > before
        previews = [u for u in log.urls if "/v1/preview" in u]
        assert previews and all(f"model={THREE}" in u for u in previews), previews
        # The result and downloads are that model's answers (K = 3: no cell instances).
        mask = segment(base, crop, THREE)
        assert mask != segment(base, crop, ONE)
        downloads = page.get_by_role("group", name="Downloads")
        assert download(page, downloads.get_by_role("link", name="Download mask (PNG)")) == mask
        probabilities = download(page, downloads.get_by_role("button", name="Download prob"))
        assert probabilities == segment(base, crop, THREE, "probabilities")
        assert np.load(io.BytesIO(probabilities)).shape == (3, 80, 96)
        expect(downloads.get_by_role("button", name="Download cell instances")).to_have_count(0)
        expect(page.locator("#cells-control")).to_be_hidden()
        labels = np.asarray(Image.open(io.BytesIO(mask)))
        assert len(np.unique(labels)) > 1
        # Loaded on first use: the picker's state follows.
        expect(picker.locator("option").nth(2)).to_have_text(f"{THREE}: ready", timeout=WAIT_MS)

        # A job from the page runs the chosen model, and its entry says which it recorded.
        page.locator("#files").set_input_files([str(tiff)])
        slice_entry = job(page, tiff.name)
        slice_entry.get_by_role("button", name=f"Run {tiff.name} as a background job").click()
        expect(slice_entry.locator(".status")).to_contain_text("Job done", timeout=WAIT_MS)
        (recorded,) = jobs(base)
        assert recorded["model"] == THREE and recorded["state"] == "done"
        expect(slice_entry.locator(".model")).to_have_text(f"Model: {THREE}")

        # Back to the default model: the result shown keeps its model's legends; a new
        # image gets the one-class model, and with it cell instances.
        picker.select_option(ONE)
        expect(card).to_contain_text("Classesclass0Threshold")
        expect(page.locator("#legend")).to_have_text("class1 class2")
        page.locator("#files").set_input_files(
            [{"name": "again.png", "mimeType": "image/png", "buffer": crop}]
        )
        again = job(page, "again.png")
        expect(again.locator(".status")).to_contain_text("Done: 96 × 80", timeout=WAIT_MS)
        expect(again.locator(".model")).to_have_text(f"Model: {ONE}")
        expect(page.locator("#legend")).to_have_text("class0")
        expect(page.locator("#cells-control")).to_be_visible()
        got = download(page, downloads.get_by_role("link", name="Download mask (PNG)"))
        assert got == segment(base, crop, ONE)
        assert downloads.get_by_role("button", name="Download cell instances").count() == 1
        # The earlier result, shown again, is still the other model's.
        job(page, "crop.png").get_by_role("button", name="Show crop.png").click()
        expect(page.locator("#result-model")).to_have_text(f"model {THREE}")
        expect(page.locator("#legend")).to_have_text("class1 class2")
        assert download(page, downloads.get_by_role("link", name="Download mask (PNG)")) == mask
        assert_accessible(page)
        assert log.external() == []


def test_with_one_model_the_page_shows_its_name_and_no_picker(weights: Path) -> None:
    with live_server(make_app(weights)) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/")
        expect(page.locator("#model-choice")).to_have_text("Nametiny", timeout=WAIT_MS)
        expect(page.locator("#model-name")).to_be_visible()
        expect(page.locator("#model-card")).to_contain_text("Classesclass0")
        expect(page.locator("select")).to_have_count(0)
        crop = png_bytes(em_crop(1, 0, 0, 64, 64))
        page.locator("#files").set_input_files(
            [{"name": "crop.png", "mimeType": "image/png", "buffer": crop}]
        )
        entry = job(page, "crop.png")
        expect(entry.locator(".status")).to_contain_text("Done: 64 × 64", timeout=WAIT_MS)
        expect(entry.locator(".model")).to_be_hidden()  # no model to tell apart
        expect(page.locator("#result-model")).to_have_text("")
        assert_accessible(page)
        assert log.external() == []
