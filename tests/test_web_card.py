"""The shipped model's card, figure for figure: its validation figures as the card holds
them, as `GET /v2/models/isbi2012` gives them and as the web page shows them (a real
browser), each with its scale and the slices it was measured on, and as docs/training.md
quotes them; and its description, on the page too (its first sentence, the rest a click away)."""

from __future__ import annotations

from pathlib import Path

import httpx
from browser import browser_page, live_server
from test_card_figures import FIGURES_DOC, table_row
from test_web_browser import WAIT_MS, assert_accessible, expect

from unet_service.api.app import create_app
from unet_service.core.engine import DEFAULT_WEIGHTS
from unet_service.core.weights import load_card
from unet_service.settings import Settings


def test_card_metadata_page_and_docs_give_the_same_figures(tmp_path: Path) -> None:
    card = load_card(DEFAULT_WEIGHTS)
    summary = card.metrics_summary()
    assert list(summary) == ["pixel_error", "instances_rand_error", "mismatch"]
    settings = Settings(
        weights=DEFAULT_WEIGHTS, device="cpu", backend="torch", jobs_dir=tmp_path / "jobs"
    )
    doc = FIGURES_DOC.read_text()
    with live_server(create_app(settings)) as base, browser_page(base) as (page, log):
        meta = httpx.get(f"{base}/v2/models/{card.name}", timeout=30).json()
        assert meta["parameters"]["metrics"] == summary
        assert meta["parameters"]["description"] == card.description

        page.goto(f"{base}/")
        model = page.locator("#model")
        # The description: its first sentence, and the rest (training, failures) a click away.
        first, rest = card.description.split(" thick). ")
        description = model.locator(".description")
        expect(description.locator("p").first).to_have_text(f"{first} thick).", timeout=WAIT_MS)
        expect(description.locator("details p")).to_be_hidden()
        description.get_by_text("How it was trained, where it fails").click()
        expect(description.locator("details p")).to_be_visible()
        expect(description.locator("details p")).to_have_text(rest)
        figures = model.locator(".figures li")
        expect(figures).to_have_count(len(summary))
        for shown, figure in zip(figures.all(), summary.values(), strict=True):
            value = f"{figure['value']:.4f}"
            expect(shown.locator(".figure")).to_have_text(value)
            expect(shown).to_contain_text(f"{value} {figure['label']}")
            expect(shown.locator(".definition")).to_have_text(figure["definition"])
            # The docs' table quotes the same figure under the same label.
            assert table_row(doc, figure["label"])[1] == value
        (where,) = {f["measured_on"] for f in summary.values()}
        assert where == "validation slices 20-23 (held out from training)"
        expect(model.locator(".figures .where")).to_have_text(f"On {where}:")
        expect(model.locator(".figures code")).to_have_text(card.metrics["command"])
        # No figure on the page is called a pixel error but the challenge's.
        text = model.inner_text()
        assert text.count("pixel error") == 1 + summary["mismatch"]["definition"].count(
            "pixel error"
        )
        assert_accessible(page)
        assert log.external() == []
