"""The web page at `/` as files: served from the package with a policy that lets it reach
only this server, every file it loads exists, no file names an external URL, and the
package ships them all. (tests/test_web_browser.py drives the page in a real browser.)"""

from __future__ import annotations

import json
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from app_helpers import make_app, running, save_tiny

from unet_service.api.routes.web import WEB_DIR

REPO = Path(__file__).resolve().parents[1]
LOADS = re.compile(r"""(?:src|href)="(/[^"]*)"|from\s+"\./([^"]+)"|import\("\./([^"]+)"\)""")

pytestmark = pytest.mark.anyio


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path)


async def test_page_and_everything_it_loads_come_from_the_service(weights: Path) -> None:
    async with running(make_app(weights)) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        pending, seen = [page.text], set()
        while pending:
            text = pending.pop()
            assert not re.search(r"https?://", text), "a page file names an external URL"
            for match in LOADS.finditer(text):
                ref = match.group(1) or f"/web/{match.group(2) or match.group(3)}"
                if ref in seen or ref.startswith("/docs"):
                    continue
                seen.add(ref)
                asset = await client.get(ref)
                assert asset.status_code == 200, ref
                assert asset.headers["content-security-policy"] == policy
                pending.append(asset.text)
        assert {"/web/app.js", "/web/style.css", "/web/render.js", "/web/viewer.js"} <= seen
        # Every shipped file is loaded by the page (none is dead weight).
        assert {f"/web/{p.name}" for p in WEB_DIR.iterdir() if p.name != "index.html"} == seen
        missing = await client.get("/web/nothing.js")
        assert missing.status_code == 404 and "error" in missing.json()
        assert (await client.get("/web/..%2Fmain.py")).status_code == 404


def test_the_package_ships_every_page_file() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["unet_service.api"]
    for path in WEB_DIR.iterdir():
        name = f"web/{path.name}"
        assert any(fnmatch(name, p) for p in patterns), f"{name} is not in package-data"


async def test_model_metadata_shows_an_old_cards_mismatch_under_its_own_name(
    weights: Path,
) -> None:
    """A card written before `pixel_error` meant only the challenge's scale called its plain
    mismatch `pixel_error`: the metadata shows it as the mismatch, defined, with the slices it
    was measured on, and shows no pixel error at all (that card has no challenge scores)."""
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["training"] = {"validation_slices": ["20", "21"]}
    overall = {"pixel_error": 0.08, "dice": 0.95, "iou": 0.9, "rand_error": 0.18}
    card["metrics"] = {
        "command": "unet-eval tiny.safetensors --update-card",
        "slices": ["20", "21"],
        "threshold": 0.4,
        "overall": overall,
    }
    card_path.write_text(json.dumps(card))
    async with running(make_app(weights)) as client:
        metrics = (await client.get("/v2/models/tiny")).json()["parameters"]["metrics"]
    assert list(metrics) == ["mismatch"]
    mismatch = metrics["mismatch"]
    assert mismatch["value"] == 0.08 and mismatch["threshold"] == 0.4
    assert mismatch["label"] == "mismatch at threshold 0.4"
    assert "not the challenge's pixel error" in mismatch["definition"]
    assert mismatch["slices"] == ["20", "21"]
    assert mismatch["measured_on"] == "validation slices 20, 21 (held out from training)"
    assert mismatch["command"] == "unet-eval tiny.safetensors --update-card"
