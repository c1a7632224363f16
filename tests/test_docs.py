"""The docs hold to the code and to each other: every link between the README and docs/ leads
to a file and a heading that exist; every module, file or folder they name in code type
exists (no page names a folder the code has left); the README keeps its two-command quick
start; and the architecture's pictures were rendered from the Mermaid sources beside them,
and show without the network."""

from __future__ import annotations

import re
from pathlib import Path

from render_diagrams import ARCHITECTURE, mermaid_blocks, recorded_hash, source_hash

from conftest import REPO

PACKAGE = REPO / "unet_service"
README = REPO / "README.md"
PAGES = [
    README,
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "weights" / "README.md",
    REPO / "deploy" / "kubernetes" / "README.md",
]
# A file named in code type: a path with one of these endings (data files and outputs, like
# `masks/NAME.tif`, are examples, not parts of the project).
NAMED_FILE = re.compile(r"^[\w./-]+\.(py|md|js|html|css|yaml|yml|toml|txt)$")


def prose(markdown: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.*)$", prose(markdown), re.M):
        name, n = slug(heading), 1
        while name in found:  # a repeated heading gets -1, -2, ...
            name, n = f"{slug(heading)}-{n}", n + 1
        found.add(name)
    return found


def links(markdown: str) -> list[str]:
    """Targets of the links and pictures in the prose (inline code dropped first)."""
    text = re.sub(r"`[^`\n]*`", "", prose(markdown))
    return re.findall(r"\]\(([^)\s]+)\)", text)


def code_spans(markdown: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(markdown))


def test_anchors_are_githubs() -> None:
    assert slug("The shipped model's figures") == "the-shipped-models-figures"
    assert slug("Jobs: `make` them, then's") == "jobs-make-them-thens"
    assert anchors("## A\n```\n## B\n```\n## A\n") == {"a", "a-1"}


def test_every_link_leads_to_a_file_and_heading_that_exist() -> None:
    checked = 0
    for page in PAGES:
        text = page.read_text()
        for target in links(text):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check offline
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            assert where.exists(), f"{page.relative_to(REPO)} links to {target}, which is missing"
            if anchor:
                assert where.suffix == ".md", f"{page.relative_to(REPO)}: {target}"
                assert anchor in anchors(where.read_text()), (
                    f"{page.relative_to(REPO)} links to {target}: no such heading"
                )
            checked += 1
    assert checked > 50  # the pages do link to each other


def test_the_readme_links_every_page_of_the_docs() -> None:
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(README.read_text())}
    for page in (REPO / "docs").glob("*.md"):
        assert page.resolve() in linked, f"the README does not link {page.relative_to(REPO)}"


def named_path_exists(name: str, page: Path = README) -> bool:
    """A path named in a page: from the repository, the page's folder or the package, or (a
    file named alone, as the architecture's table names a subpackage's modules) somewhere in
    the package."""
    name = name.rstrip("/") or name
    if any((base / name).exists() for base in (REPO, page.parent, PACKAGE)):
        return True
    return "/" not in name and any(PACKAGE.rglob(name))


def test_the_docs_name_only_paths_that_exist() -> None:
    for page in PAGES:
        for span in code_spans(page.read_text()):
            if NAMED_FILE.match(span):
                assert named_path_exists(span, page), f"{page.relative_to(REPO)} names {span}"
    # The architecture names folders too, and its pictures name modules.
    text = ARCHITECTURE.read_text()
    folders = [s for s in code_spans(text) if re.fullmatch(r"[\w.]+(/[\w.]+)*/", s)]
    assert "core/" in folders and "jobs/table/" in folders
    for folder in folders:
        assert named_path_exists(folder), f"docs/architecture.md names {folder}"
    for _, source in mermaid_blocks(text):
        for module in re.findall(r"[\w/]+\.py", source):
            assert named_path_exists(module), f"a picture names {module}"
    # The check has teeth: the layout before unet_service/ is gone.
    assert not named_path_exists("app/service.py") and not named_path_exists("model/")


def test_the_readme_keeps_its_two_command_quick_start() -> None:
    match = re.search(r"^## Quick start\n\n```bash\n(.*?)^```", README.read_text(), re.M | re.S)
    assert match
    commands = [line.split("#")[0].strip() for line in match[1].splitlines()]
    assert commands == ["make serve", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_the_architecture_pictures_are_rendered_from_their_sources() -> None:
    text = ARCHITECTURE.read_text()
    blocks = mermaid_blocks(text)
    assert [name for name, _ in blocks] == ["architecture-request.svg", "architecture-job.svg"]
    for name, source in blocks:
        picture = REPO / "docs" / name
        svg = picture.read_text()
        assert recorded_hash(svg) == source_hash(source), (
            f"docs/{name} is not the picture of its Mermaid source: "
            "run tests/render_diagrams.py (see its docstring)"
        )
        assert f"]({name})" in prose(text), f"docs/architecture.md does not show {name}"
        # Shown without the network: nothing fetched, no fonts, images or styles from outside.
        assert not re.search(r"""(href|src)=["']?https?:|url\(["']?https?:|@import""", svg)
