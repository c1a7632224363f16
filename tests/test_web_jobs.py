"""The web page's "Run as a background job" in a real browser: an ISBI slice (as a TIFF) over
a small UNET_MAX_PIXELS is refused by /v1/segment (413); its entry then offers the job API,
shows the job's tiles, pages and time left as the worker computes them, and downloads the
job's result with the API key. A cancelled job, one deleted elsewhere, a failed one and a
file the job API refuses too say what happened."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import math
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from app_helpers import (
    Stepper,
    em_crop,
    make_app,
    service_of,
    stepped,
    tiff_bytes,
    wrapped_forward,
)
from browser import browser_page, live_server
from test_web_browser import KEY, SLICE, WAIT_MS, api, assert_accessible, expect, job, weights

__all__ = ["weights"]  # the fixture


def slice_tiff(tmp_path: Path, index: int) -> Path:
    """ISBI training slice `index` as a TIFF (512 x 512): jobs read TIFFs window by window,
    at any size; other formats only up to UNET_MAX_PIXELS."""
    path = tmp_path / f"slice{index:02d}.tif"
    path.write_bytes(tiff_bytes(em_crop(index, 0, 0, 512, 512)))
    return path


def jobs_app(weights: Path, tmp_path: Path, **overrides: object):
    """A slice (512 x 512) is too large for a request here, not for a job."""
    values = {
        "max_pixels": 100 * 100,
        "jobs_dir": tmp_path / "jobs",
        "job_progress_s": 0.02,
        "job_batch_tiles": 8,
    }
    return make_app(weights, **(values | overrides))


def allow(stepper: Stepper, passes: int) -> None:
    """Stepper.allow from this thread, whose event loop is Playwright's."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, stepper.allow(passes)).result()


def jobs(base: str, key: str | None = None) -> list[dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{base}/v1/jobs", headers=headers, timeout=30).json()["jobs"]


def record_statuses(page) -> None:
    """From now on, every text an entry's status shows, however briefly, is kept in
    window.shown."""
    page.evaluate(
        """() => { window.shown = [];
            new MutationObserver(() => document.querySelectorAll('li.job .status')
                .forEach(s => window.shown.push(s.textContent)))
            .observe(document.getElementById('jobs'),
                     {subtree: true, childList: true, characterData: true}); }"""
    )


def test_a_slice_too_large_for_a_request_runs_as_a_job_and_downloads(
    weights: Path, tmp_path: Path
) -> None:
    app = jobs_app(weights, tmp_path, api_key=KEY)
    tiff = slice_tiff(tmp_path, 0)
    errors: list[str] = []
    with live_server(app) as base, browser_page(base) as (page, log):
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/")
        page.get_by_label("API key").fill(KEY)
        page.get_by_label("API key").press("Enter")
        expect(page.locator("#model")).to_contain_text("tiny", timeout=WAIT_MS)
        refused = api(base, tiff.read_bytes(), tiff.name, key=KEY)
        assert refused.status_code == 413
        entry = job(page, tiff.name)
        with stepped(service_of(app)) as stepper:
            page.locator("#files").set_input_files([str(tiff)])
            expect(entry.locator(".status")).to_contain_text(
                f"Too large for this server (413): {refused.json()['error']}", timeout=WAIT_MS
            )
            record_statuses(page)
            entry.get_by_role("button", name=f"Run {tiff.name} as a background job").click()
            # The worker holds the job's first pass: the page shows it running, no tile done.
            expect(entry.locator(".status")).to_contain_text("Job running: 0 of", timeout=WAIT_MS)
            (created,) = jobs(base, KEY)
            total = created["progress"]["tiles_total"]
            assert created["input"]["name"] == tiff.name and total > 8
            expect(entry.locator(".status")).to_have_text(
                f"Job running: 0 of {total} tiles (0%), 0 of 1 page"
            )
            allow(stepper, 1)  # one pass; the next one is held
            status = entry.locator(".status")
            expect(status).not_to_contain_text("Job running: 0 of", timeout=WAIT_MS)
            (running,) = jobs(base, KEY)
            progress = running["progress"]
            done, fraction = progress["tiles_done"], progress["fraction"]
            assert 0 < done < total and running["eta_s"] > 0
            pct = math.floor(100 * fraction + 0.5)  # as the page's Math.round
            expect(status).to_have_text(
                re.compile(
                    rf"Job running: {done} of {total} tiles \({pct}%\), 0 of 1 page, "
                    r"about \d+ (s|min) left"
                )
            )
            assert entry.locator("progress").evaluate("p => p.value") == pytest.approx(fraction)
        expect(entry.locator(".status")).to_have_text(
            f"Job done: 512 × 512 pixels, {total} tiles", timeout=WAIT_MS
        )
        shown = [s.split(":")[0] for s in page.evaluate("window.shown")]
        steps = [a for a, b in zip(shown, [None, *shown[:-1]], strict=True) if a != b]
        assert steps[-2:] == ["Job running", "Job done"], steps

        (done,) = jobs(base, KEY)
        assert done["state"] == "done"
        headers = {"Authorization": f"Bearer {KEY}"}
        result = httpx.get(f"{base}{done['result']['url']}", headers=headers, timeout=30)
        with page.expect_download() as info:
            entry.get_by_role("button", name=f"Download the mask of {tiff.name} (TIFF)").click()
        assert info.value.suggested_filename == "slice00_mask.tif"
        assert Path(info.value.path()).read_bytes() == result.content
        mask = tifffile.imread(io.BytesIO(result.content))
        assert mask.shape == (512, 512) and set(np.unique(mask)) == {0, 255}
        assert_accessible(page)
        assert errors == [] and log.external() == []


def failing(batch: np.ndarray) -> np.ndarray:
    raise RuntimeError("a forward pass failed on purpose")


def test_cancelled_failed_and_refused_jobs_say_what_happened(weights: Path, tmp_path: Path) -> None:
    app = jobs_app(weights, tmp_path)
    first, second = slice_tiff(tmp_path, 0), slice_tiff(tmp_path, 1)
    with live_server(app) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/")
        expect(page.locator("#server-state")).to_have_text("Ready", timeout=WAIT_MS)
        entry = job(page, first.name)
        with stepped(service_of(app)):
            page.locator("#files").set_input_files([str(first)])
            entry.get_by_role("button", name=f"Run {first.name} as a background job").click()
            expect(entry.locator(".status")).to_contain_text("Job running: 0 of", timeout=WAIT_MS)
            entry.get_by_role("button", name=f"Cancel the job of {first.name}").click()
            expect(entry.locator(".status")).to_have_text(
                "Job cancelled (and deleted on the server)", timeout=WAIT_MS
            )
            assert jobs(base) == []
            expect(entry.get_by_role("button")).to_have_count(0)

            # Deleted by another client while the page follows it: the page says so.
            again = tmp_path / "again.tif"
            again.write_bytes(first.read_bytes())
            entry = job(page, again.name)
            page.locator("#files").set_input_files([str(again)])
            entry.get_by_role("button", name=f"Run {again.name} as a background job").click()
            expect(entry.locator(".status")).to_contain_text("Job running: 0 of", timeout=WAIT_MS)
            (elsewhere,) = jobs(base)
            gone = httpx.delete(f"{base}/v1/jobs/{elsewhere['id']}", timeout=30)
            assert gone.status_code == 200
            expect(entry.locator(".status")).to_have_text(
                f"Job {elsewhere['id']} lost: Not found on this server (404): "
                f"no job {elsewhere['id']}",
                timeout=WAIT_MS,
            )
            expect(entry.get_by_role("button")).to_have_count(0)

        entry = job(page, second.name)
        with wrapped_forward(service_of(app), failing):
            page.locator("#files").set_input_files([str(second)])
            entry.get_by_role("button", name=f"Run {second.name} as a background job").click()
            expect(entry.locator(".status")).to_contain_text("Job failed: ", timeout=WAIT_MS)
        (failed,) = jobs(base)
        assert failed["state"] == "failed" and failed["error"]
        expect(entry.locator(".status")).to_have_text(f"Job failed: {failed['error']}")
        expect(entry.locator(".status")).to_have_class("status error")

        # A PNG is decoded whole, by jobs too: the job API's refusal says so.
        entry = job(page, SLICE.name)
        page.locator("#files").set_input_files([str(SLICE)])
        entry.get_by_role("button", name=f"Run {SLICE.name} as a background job").click()
        with SLICE.open("rb") as f:
            refused = httpx.post(f"{base}/v1/jobs", files={"file": f}, timeout=30)
        assert refused.status_code == 413 and "save it as a TIFF" in refused.json()["error"]
        expect(entry.locator(".status")).to_have_text(
            f"Not taken as a job either: Too large for this server (413): "
            f"{refused.json()['error']}",
            timeout=WAIT_MS,
        )
        assert len(jobs(base)) == 1
        assert log.external() == []
