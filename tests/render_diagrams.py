"""Renders the pictures of docs/architecture.md from its Mermaid sources: each ```mermaid block
whose first line is `%% picture: NAME.svg` becomes docs/NAME.svg, which records the hash of
its source (tests/test_docs.py checks it), so the page shows its diagrams where Mermaid is not
drawn (offline, in an editor) and a changed source without its picture fails the suite.

Needs the Mermaid command line and a Chromium (no network once installed):

    PUPPETEER_SKIP_DOWNLOAD=1 npm install --prefix /tmp/mmdc @mermaid-js/mermaid-cli
    MMDC=/tmp/mmdc/node_modules/.bin/mmdc CHROMIUM=/usr/bin/chromium \\
        .venv/bin/python tests/render_diagrams.py
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ARCHITECTURE = DOCS / "architecture.md"
PICTURE = re.compile(r"^%% picture: (\S+\.svg)$")
STAMP_TEXT = "<!-- rendered from its Mermaid source in docs/architecture.md, sha256 {} -->"
STAMP = re.compile("^" + re.escape(STAMP_TEXT).replace(r"\{\}", r"(\w+)"))
FONTS = "Arial, Liberation Sans, Helvetica, sans-serif"
# Notes get a wide margin: their width is measured in the renderer's font, and a viewer's
# Arial may be a little wider.
CONFIG = {
    "theme": "neutral",
    "themeVariables": {"fontFamily": FONTS, "fontSize": "14px"},
    "sequence": {
        "useMaxWidth": False,
        "noteMargin": 25,
        **{f"{part}FontFamily": FONTS for part in ("actor", "note", "message")},
        **{f"{part}FontSize": 14 for part in ("actor", "note", "message")},
    },
}


def mermaid_blocks(markdown: str) -> list[tuple[str, str]]:
    """(picture file name, source) of each Mermaid block that names its picture."""
    blocks = re.findall(r"^```mermaid\n(.*?)^```", markdown, re.M | re.S)
    found = []
    for source in blocks:
        match = PICTURE.match(source.splitlines()[0])
        assert match, f"a Mermaid block names no picture: {source.splitlines()[0]!r}"
        found.append((match[1], source))
    return found


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def recorded_hash(svg: str) -> str | None:
    match = STAMP.match(svg)
    return match[1] if match else None


def render(source: str, out: Path, mmdc: str, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "in.mmd").write_text(source)
        (work / "config.json").write_text(json.dumps(CONFIG))
        browser = {"executablePath": chromium, "args": ["--no-sandbox", "--disable-gpu"]}
        (work / "puppeteer.json").write_text(json.dumps(browser))
        command = [mmdc, "-q", "-i", "in.mmd", "-o", "out.svg", "-c", "config.json"]
        subprocess.run([*command, "-p", "puppeteer.json"], cwd=work, check=True)
        svg = (work / "out.svg").read_text()
    out.write_text(f"{STAMP_TEXT.format(source_hash(source))}\n{svg}\n")


def main() -> None:
    mmdc = os.environ.get("MMDC", "mmdc")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for name, source in mermaid_blocks(ARCHITECTURE.read_text()):
        render(source, DOCS / name, mmdc, chromium)
        print(f"docs/{name}")


if __name__ == "__main__":
    main()
