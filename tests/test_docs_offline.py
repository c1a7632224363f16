"""The API docs work without internet: every asset of /docs and /redoc comes from the
service itself, and "Try it out" on /v1/segment returns a mask in a real browser."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from app_helpers import em_crop, make_app, png_bytes, running, save_tiny
from browser import browser_page, live_server

URL = re.compile(
    r"""(?:src|href)\s*=\s*["']([^"']+)["']|(?:url|openapi_url|url)\s*:\s*["']([^"']+)["']"""
)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path)


@pytest.mark.anyio
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_reference_only_their_own_assets(weights: Path, page: str) -> None:
    async with running(make_app(weights)) as client:
        r = await client.get(page)
        assert r.status_code == 200
        html = r.text
        assert not re.search(r"https?://", html), "the page names an external URL"
        refs = [a or b for a, b in URL.findall(html)]
        assert any(ref.endswith(".js") for ref in refs), refs
        for ref in refs:
            asset = await client.get(urljoin(f"http://test{page}", ref))
            assert asset.status_code == 200, (ref, asset.status_code)
            assert asset.content


def test_swagger_ui_try_it_out_segments_an_upload(weights: Path, tmp_path: Path) -> None:
    upload = tmp_path / "slice.png"
    upload.write_bytes(png_bytes(em_crop(0, 0, 0, 96, 96)))
    app = make_app(weights)
    with live_server(app) as base, browser_page(base) as (page, log):
        page.goto(f"{base}/docs")
        operation = page.locator(".opblock-post", has_text="/v1/segment")
        operation.locator(".opblock-summary").click()
        operation.get_by_role("button", name="Try it out").click()
        operation.locator("input[type=file]").set_input_files(str(upload))
        with page.expect_response(lambda r: "/v1/segment" in r.url) as response_info:
            operation.get_by_role("button", name="Execute").click()
        assert response_info.value.status == 200
        # Swagger UI shows the answer: status 200 and the mask as an image.
        live = operation.locator(".live-responses-table")
        image = live.locator("tbody img").first
        image.wait_for()
        assert live.locator("tbody .response-col_status").first.inner_text().strip() == "200"
        shown = image.get_attribute("src")
        assert shown and shown.startswith("blob:")
        body = page.evaluate(
            "async (src) => Array.from(new Uint8Array(await (await fetch(src)).arrayBuffer()))",
            shown,
        )
        # The same upload through a plain client gives the same mask PNG.
        expected = httpx.post(
            f"{base}/v1/segment", files={"file": ("slice.png", upload.read_bytes())}, timeout=60
        )
        assert bytes(body) == expected.content
        assert log.external() == []
