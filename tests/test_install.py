"""A reproducible, compiler-free install: requirements.lock pins every runtime dependency
with its hashes and agrees with pyproject.toml, the tests run on exactly those versions,
and scripts/wheel builds a wheel with the C hot path inside that installs without a
compiler."""

from __future__ import annotations

import re
import subprocess
import tomllib
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.stack import REPO

LOCK = REPO / "requirements.lock"


def _locked() -> dict[str, tuple[Version, list[str]]]:
    """Each locked package: its version and hashes."""
    out: dict[str, tuple[Version, list[str]]] = {}
    for entry in re.split(r"\n(?=\S)", LOCK.read_text()):
        found = re.match(r"([A-Za-z0-9._-]+)==(\S+)", entry)
        if found:
            out[canonicalize_name(found[1])] = (Version(found[2]),
                                                re.findall(r"--hash=sha256:([0-9a-f]{64})", entry))
    return out


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_the_lock_pins_every_dependency_within_pyprojects_bounds_with_hashes() -> None:
    locked = _locked()
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements.lock: run scripts/lock"
        version = locked[name][0]
        assert requirement.specifier.contains(version), \
            f"{name} {version} is outside {requirement.specifier}: run scripts/lock"
    assert all(hashes for _, hashes in locked.values())


def test_the_tests_run_on_the_locked_versions() -> None:
    """Celery's and kombu's message layout (ingestd.celery.codec) and confluent-kafka's Message
    (ingestd.rdkafka) are proven on exactly these."""
    drifted = {name: (str(version), metadata.version(name))
               for name, (version, _) in _locked().items()
               if Version(metadata.version(name)) != version}
    assert not drifted, f"installed versions differ from requirements.lock: {drifted}"


@pytest.mark.slow
def test_the_wheel_carries_the_c_hot_path_and_installs_without_a_compiler(
        tmp_path: Path) -> None:
    subprocess.run([str(REPO / "scripts" / "wheel"), str(tmp_path / "dist")], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("ingestd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"ingestd/_native\.cpython-.*\.so", n) for n in names), names
    venv.create(tmp_path / "host", with_pip=True)
    python = tmp_path / "host" / "bin" / "python"
    env = {"PATH": "/nonexistent", "CC": "/bin/false"}  # no compiler to be found
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, env=env, timeout=300)
    out = subprocess.run([str(python), "-c", "import ingestd._native as n; print(n.__file__)"],
                         check=True, capture_output=True, text=True, env=env, timeout=60,
                         cwd=tmp_path)
    assert out.stdout.strip().startswith(str(tmp_path / "host")), out.stdout
