"""The locks (requirements/*.txt, made by `bash requirements/update.sh`) agree with
pyproject.toml, with each other and with what is installed: a dependency added, dropped or
moved in pyproject.toml without a new lock fails here, and so does a test run on versions
the lock does not name."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = {"runtime.txt": (), "test.txt": ("test",), "bench.txt": ("test", "bench")}
PROJECT = "report-forwarder"


@dataclass
class Pin:
    version: Version
    marker: Marker | None
    hashes: int = 0
    via: set[str] = field(default_factory=set)

    def applies(self) -> bool:
        return self.marker is None or self.marker.evaluate()


def read_lock(name: str) -> dict[str, Pin]:
    """The pins of one lock: name -> version, marker, hash count, and who asks for it."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for raw in (ROOT / "requirements" / name).read_text().splitlines():
        line = raw.strip()
        if not line:
            continue
        if not raw.startswith((" ", "#")):
            spec, _, marker = line.rstrip("\\ ").partition(";")
            package, _, version = spec.strip().partition("==")
            assert version, f"requirements/{name}: {line!r} is not pinned with =="
            current = Pin(Version(version), Marker(marker.strip()) if marker.strip() else None)
            pins[canonicalize_name(package)] = current
        elif current is not None and line.startswith("--hash="):
            current.hashes += 1
        elif current is not None and line.startswith("#"):
            who = line.lstrip("#").strip().removeprefix("via").strip()
            if who:
                current.via.add(re.split(r"[ \[]", who)[0])
    return pins


def direct(extras: tuple[str, ...]) -> list[Requirement]:
    """pyproject.toml's requirements with these extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in extras:
        listed += project["optional-dependencies"][extra]
    return [Requirement(one) for one in listed]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_pins_what_pyproject_asks_for(lock: str) -> None:
    """Every requirement pyproject.toml lists for a lock's extras is pinned there at a
    version its range admits, with a marker where it has one."""
    pins = read_lock(lock)
    wrong = []
    for requirement in direct(LOCKS[lock]):
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            wrong.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            wrong.append(f"{requirement} but the lock has {pin.version}")
        elif requirement.marker is not None and pin.marker is None:
            wrong.append(f"{requirement} is pinned without its marker")
    assert [] == wrong, f"requirements/{lock} is stale; run `bash requirements/update.sh`"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_holds_nothing_pyproject_dropped(lock: str) -> None:
    """The packages a lock says the project asks for are exactly the ones pyproject.toml
    lists for its extras (a dependency dropped from pyproject.toml leaves the lock too)."""
    pins = read_lock(lock)
    asked = {name for name, pin in pins.items() if PROJECT in pin.via}
    assert {canonicalize_name(one.name) for one in direct(LOCKS[lock])} == asked, (
        f"requirements/{lock} is stale; run `bash requirements/update.sh`"
    )


def test_every_package_of_the_runtime_lock_has_hashes() -> None:
    """The runtime lock, which the Dockerfile installs with --require-hashes, has hashes
    for every package."""
    pins = read_lock("runtime.txt")
    assert pins
    assert [] == [name for name, pin in pins.items() if pin.hashes == 0]


def test_the_locks_are_one_resolution() -> None:
    """A package two locks hold is at one version in both (the narrower locks are made
    within the widest)."""
    locks = {name: read_lock(name) for name in LOCKS}
    widest = locks["bench.txt"]
    moved = [
        f"{package}: {pin.version} in {name}, {widest[package].version} in bench.txt"
        for name, pins in locks.items()
        for package, pin in pins.items()
        if package not in widest or widest[package].version != pin.version
    ]
    assert [] == moved


def test_the_tests_run_on_the_locked_versions() -> None:
    """Every package the test lock names for this platform is installed at its locked
    version (install with `pip install -e '.[test]' -c requirements/test.txt`)."""
    pins = read_lock("test.txt")
    drift = []
    for package, pin in pins.items():
        if not pin.applies():
            continue
        try:
            installed = Version(importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            drift.append(f"{package}=={pin.version} is not installed")
            continue
        if installed != pin.version:
            drift.append(f"{package} {installed} is installed, the lock has {pin.version}")
    assert [] == drift, (
        "install the locked versions: pip install -e '.[test]' -c requirements/test.txt"
    )


def test_every_install_the_project_documents_uses_the_lock() -> None:
    """The Quick start and .ci/run install with the test lock as constraints, the
    Dockerfile from the runtime lock with its hashes checked."""
    readme = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    quick_start_install = readme.split("```", 2)[1]
    assert "-c requirements/test.txt" in quick_start_install
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c requirements/test.txt" in ci
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r requirements/runtime.txt" in dockerfile
    assert "--no-deps" in dockerfile
