"""Takes docs/web-page.png: the page at `/` serving the shipped weights, with two ISBI slices
segmented (a training slice, then a test slice, which is shown); with --cells, the overlay
colours each cell instance. The settings come from the environment as for `unet-serve`:
with a model repository (UNET_MODELS, UNET_DEFAULT_MODEL) the page shows its model picker,
and --model NAME is chosen in it.

    .venv/bin/python tests/web_screenshot.py [--out docs/web-page.png] [--cells] [--model NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from browser import browser_page, live_server

from conftest import ISBI, REPO
from unet_service.api.app import create_app
from unet_service.settings import Settings

SLICES = [ISBI / "train" / "image" / "05.png", ISBI / "test" / "10.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "web-page.png")
    parser.add_argument("--cells", action="store_true", help='with "Colour each cell" on')
    parser.add_argument("--model", help="the model to choose in the picker (UNET_MODELS)")
    args = parser.parse_args()
    settings = Settings(weights=REPO / "weights" / "isbi2012.safetensors", device="cpu")
    with live_server(create_app(settings)) as base, browser_page(base) as (page, log):
        page.set_viewport_size({"width": 1440, "height": 640})
        page.goto(f"{base}/")
        page.locator("#model-card").get_by_text("Tile sizes", exact=True).wait_for()
        if args.model:
            page.get_by_label("Name", exact=True).select_option(args.model)
        page.locator("#files").set_input_files([str(p) for p in SLICES])
        for path in SLICES:
            entry = page.locator("li.job").filter(has=page.get_by_text(path.name, exact=True))
            entry.get_by_text("Done:").wait_for(timeout=120_000)
        if args.cells:
            page.get_by_label("Colour each cell").check()
            page.wait_for_selector("[data-panel=overlay][data-colouring=cells]", timeout=120_000)
        page.locator("#server-queue").get_by_text("0 images").wait_for()
        page.locator("body").click(position={"x": 5, "y": 5})  # no focus ring in the picture
        page.screenshot(path=str(args.out), full_page=True)
        assert log.external() == [], log.external()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
