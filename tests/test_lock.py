"""The lock (requirements/*.txt, written by `make lock`) matches pyproject.toml: every
dependency is locked at a version its specifier admits, every dependency of a locked package is
locked too, nothing else is, and the virtual environment holds exactly the locked versions.

The dependencies of each locked package are read from its installed metadata, which is the
locked release's own (the last test checks), so this needs `make install`, not the network."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
SERVE_LOCK = REPO / "requirements" / "serve.txt"
DEV_LOCK = REPO / "requirements" / "dev.txt"
# torch is pinned by version outside the lock (Makefile, Dockerfile), because its build
# differs per machine and per image; its own dependencies are in the lock.
UNLOCKED = {"torch"}

# The platform `make lock` resolves for (--python-version 3.11, --python-platform
# x86_64-manylinux_2_28): markers are evaluated for it, not for whatever runs the tests.
LOCK_ENVIRONMENT = default_environment() | {
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_machine": "x86_64",
}


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: tuple[str, ...]


def read_lock(path: Path) -> dict[str, Pin]:
    """name -> pin, for the entries whose marker holds on the lock's platform."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins: dict[str, Pin] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        words = line.split(" --hash=")
        req = Requirement(words[0])
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {line} is not pinned with =="
        if req.marker is None or req.marker.evaluate(LOCK_ENVIRONMENT):
            name = canonicalize_name(req.name)
            assert name not in pins, f"{path.name}: {name} twice"
            pins[name] = Pin(spec.version, tuple(w.strip() for w in words[1:]))
    return pins


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def makefile_extras(variable: str) -> list[str]:
    """The Makefile's SERVE_EXTRAS or DEV_EXTRAS that pyproject.toml defines, as `make
    install` and `make lock` take them."""
    (line,) = re.findall(rf"^{variable} :?= (.*)$", (REPO / "Makefile").read_text(), re.M)
    return [e for e in line.split() if e in pyproject().get("optional-dependencies", {})]


def dev_extras() -> list[str]:
    return makefile_extras("DEV_EXTRAS")


def serve_extras() -> list[str]:
    return makefile_extras("SERVE_EXTRAS")


def roots(extras: list[str]) -> list[Requirement]:
    project = pyproject()
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(LOCK_ENVIRONMENT | {"extra": e}) for e in extras or {""})


def closure(start: list[Requirement], *, into_torch: bool = True) -> set[str]:
    """Every package the requirements need, transitively, by the installed metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = list(start)
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        if name == "torch" and not into_torch:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # test_environment_is_the_lock names it
        stack += [d for d in map(Requirement, requires) if applies(d, set(req.extras))]
    return {name for name, _ in seen}


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="module")
def serve() -> dict[str, Pin]:
    return read_lock(SERVE_LOCK)


@pytest.fixture(scope="module")
def dev() -> dict[str, Pin]:
    return read_lock(DEV_LOCK)


def test_every_entry_is_pinned_with_hashes(serve: dict[str, Pin], dev: dict[str, Pin]) -> None:
    for pins in (serve, dev):
        for name, pin in pins.items():
            assert pin.hashes and all(h.startswith("sha256:") for h in pin.hashes), name
    for path in (SERVE_LOCK, DEV_LOCK):
        assert "make lock" in path.read_text().split("\n", 3)[1], f"{path.name}: by make lock"


@pytest.mark.parametrize("which", ["serve", "dev"])
def test_every_pyproject_dependency_is_locked_at_an_admitted_version(
    which: str, serve: dict[str, Pin], dev: dict[str, Pin]
) -> None:
    pins, extras = (serve, serve_extras()) if which == "serve" else (dev, dev_extras())
    for req in roots(extras):
        name = canonicalize_name(req.name)
        if name in UNLOCKED or not applies(req, {""}):
            continue
        assert name in pins, f"{req} is not in the {which} lock: run `make lock`"
        assert req.specifier.contains(pins[name].version, prereleases=True), (
            f"the {which} lock has {name}=={pins[name].version}, outside {req}: run `make lock`"
        )


@pytest.mark.parametrize("which", ["serve", "dev"])
def test_lock_holds_the_dependency_tree_and_nothing_else(
    which: str, serve: dict[str, Pin], dev: dict[str, Pin]
) -> None:
    pins, extras = (serve, serve_extras()) if which == "serve" else (dev, dev_extras())
    needed = closure(roots(extras))
    if Version(metadata.version("torch")).local != "cpu":
        # The lock is resolved for the CPU build of torch; a CUDA build (make install
        # TORCH=...) brings CUDA libraries of its own, which stay outside the lock.
        needed -= (needed - closure(roots(extras), into_torch=False)) - set(pins)
    missing = needed - set(pins) - UNLOCKED
    stale = set(pins) - needed
    assert not missing, f"needed but not in the {which} lock: {sorted(missing)}; run `make lock`"
    assert not stale, f"in the {which} lock but needed by nothing: {sorted(stale)}; `make lock`"


def test_serving_lock_is_part_of_the_dev_lock(serve: dict[str, Pin], dev: dict[str, Pin]) -> None:
    # One version of each package everywhere: the images run what the tests ran.
    assert {n: p.version for n, p in serve.items()} == {n: dev[n].version for n in serve}


def test_environment_is_the_lock(dev: dict[str, Pin]) -> None:
    wrong = {
        name: (pin.version, installed(name))
        for name, pin in dev.items()
        if installed(name) is None or Version(installed(name)) != Version(pin.version)
    }
    assert not wrong, f"(locked, installed) differ: {wrong}; run `make install`"


def test_torch_is_the_release_the_lock_was_resolved_for() -> None:
    (makefile,) = re.findall(r"^TORCH_VERSION :?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    (docker,) = re.findall(r"^ARG TORCH_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert makefile == docker
    assert Version(metadata.version("torch")).base_version == makefile
    (torch,) = [r for r in roots([]) if canonicalize_name(r.name) == "torch"]
    assert torch.specifier.contains(makefile)
