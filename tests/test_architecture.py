"""The house's shape, held by tests rather than by good intentions: one top-level package in
the wheel; the torch-free subpackages import with torch blocked; no import cycle, counting
every import (in functions and under TYPE_CHECKING too); no module over 300 lines; one module
writes TIFF files and one walks a TIFF's chain of pages."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "unet_service"
# What imports without torch: the image input and output, the pipeline, the job table and
# files, the settings and choices, and the torch-free parts of the core.
TORCH_FREE = (
    "unet_service",
    "unet_service.errors",
    "unet_service.options",
    "unet_service.settings",
    "unet_service.imaging",
    "unet_service.pipeline",
    "unet_service.jobs.table",
    "unet_service.jobs.files",
    "unet_service.core.geometry",
    "unet_service.core.tiling",
    "unet_service.serving.limits",
    "unet_service.serving.queued",
)
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The package's modules `path` imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_the_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(PACKAGE, tmp_path / "unet_service", ignore=shutil.ignore_patterns("*.pyc"))
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    dist = tmp_path / "dist"
    subprocess.run([*build, "-w", str(dist), str(tmp_path)], check=True, capture_output=True)
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (top_level,) = [n for n in archive.namelist() if n.endswith("top_level.txt")]
        assert archive.read(top_level).decode().split() == ["unet_service"]
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert tops - {"unet_service"} == {wheel.name.rsplit("-", 3)[0] + ".dist-info"}


def test_the_torch_free_subpackages_import_with_torch_blocked() -> None:
    wanted = sorted(
        m for m in MODULES if m in TORCH_FREE or any(m.startswith(f"{p}.") for p in TORCH_FREE[1:])
    )
    assert (
        "unet_service.imaging.tiff_source" in wanted and "unet_service.pipeline.to_file" in wanted
    )
    script = "import importlib, sys\nsys.modules['torch'] = None\n" + "".join(
        f"importlib.import_module({name!r})\n" for name in wanted
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # And the check has teeth: a module that needs torch fails the same way.
    blocked = "import sys\nsys.modules['torch'] = None\nimport unet_service.core.engine\n"
    assert subprocess.run([sys.executable, "-c", blocked], capture_output=True).returncode


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (its nodes, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_even_behind_type_checking() -> None:
    graph = {name: imports_of(path) - {name} for name, path in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    # The search finds the cycles it is there to find.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_package_inits_import_nothing() -> None:
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            assert not imports_of(path), f"{name} imports {imports_of(path)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_300_lines(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_one_module_writes_tiff_files_and_one_walks_their_pages() -> None:
    writes = re.compile(r"\bTiffWriter\(|\bimwrite\(")
    # A TiffFile's chain of pages iterated or counted (the project names them `tif`).
    walks = re.compile(r"\b(in|enumerate\(|len\()\s*[\w.]*\btif\.pages\b")
    writers = [name for name, path in MODULES.items() if writes.search(path.read_text())]
    walkers = [name for name, path in MODULES.items() if walks.search(path.read_text())]
    assert writers == ["unet_service.imaging.tiff_volume"]
    assert walkers == ["unet_service.imaging.tiff_pages"]
