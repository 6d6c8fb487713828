"""The systemd unit, deploy/systemd/ingestd.service: it loads without complaint, its
sandbox rates 3.0 or better, and the sandbox leaves ingestd what it uses.

Needs ``systemd-analyze`` (no services). A missing one fails these tests, it does
not skip them: scripts/test installs Debian's ``systemd`` package when it runs as
root and names the package otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.stack import REPO

UNIT = REPO / "deploy" / "systemd" / "ingestd.service"
MAX_EXPOSURE = 3.0  # systemd-analyze security's scale: 0.0 (locked down) to 10.0 (unsafe)
EXPOSURE = re.compile(r"Overall exposure level for ingestd\.service: (\d+(?:\.\d+)?)")
# ExecStart=-/path args: the executable, after systemd's optional prefixes.
EXEC = re.compile(r"^(Exec\w+=[-@:+!]*)(/\S+)", re.M)


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: scripts/test installs it when run as root; "
                    "otherwise: sudo apt-get install systemd")
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0", "LC_ALL": "C.UTF-8"}
    return subprocess.run([exe, "--no-pager", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def settings(unit: str) -> dict[str, list[str]]:
    """Every value of every directive, in order (SystemCallFilter= may come twice)."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` exits 0 and prints nothing.

    verify also requires every Exec*= command to exist, and
    /opt/ingestd/venv/bin/ingestd exists only where ingestd is installed. So it runs
    on a copy of the unit, under the same name, in which each Exec*= executable that
    is missing on this machine is replaced by ``true``; every directive is still
    parsed and checked, only those paths are not. This keeps the test strict (exit
    status 0 and no output at all) instead of filtering verify's output for one
    message whose wording changes between systemd versions, which could also hide
    another complaint on the same line.
    """
    true = shutil.which("true")
    assert true is not None

    def executable(match: re.Match[str]) -> str:
        path = match.group(2)
        return match.group(1) + (path if os.access(path, os.X_OK) else true)

    copy = tmp_path / UNIT.name
    copy.write_text(EXEC.sub(executable, UNIT.read_text()))
    result = systemd_analyze("verify", "--man=no", str(copy))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, (
        f"systemd-analyze verify exited {result.returncode}:\n{output}")


def test_unit_exposure_is_at_most_3() -> None:
    """``systemd-analyze security --offline=true``: the overall exposure level, and the
    same bound as ``--threshold`` (the exit status is 1 above it; tenths of a point)."""
    result = systemd_analyze("security", "--offline=true",
                             f"--threshold={round(MAX_EXPOSURE * 10)}", str(UNIT))
    match = EXPOSURE.search(result.stdout)
    assert match is not None, f"no overall exposure level in:\n{result.stdout}{result.stderr}"
    exposure = float(match.group(1))
    exposed = "\n".join(line for line in result.stdout.splitlines() if line.startswith("✗"))
    assert exposure <= MAX_EXPOSURE, (
        f"exposure {exposure} > {MAX_EXPOSURE}; what the unit leaves open:\n{exposed}")
    assert result.returncode == 0, result.stderr


def test_sandbox_keeps_what_ingestd_uses() -> None:
    """What the daemon needs and a later edit of the unit could take away."""
    unit = settings(UNIT.read_text())
    # Kafka and the Celery broker over IPv4/IPv6 and the metrics listener; sd_notify
    # (ingestd/supervisor/systemd.py); glibc's getaddrinfo asks the kernel over netlink.
    needed = {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    families = " ".join(unit.get("RestrictAddressFamilies", [" ".join(sorted(needed))]))
    assert not families.startswith("~") and needed <= set(families.split())
    # The metrics files live in the RuntimeDirectory=, which systemd creates and,
    # under ProtectSystem=strict, leaves writable.
    runtime = f"/run/{unit['RuntimeDirectory'][0]}/"
    assert f"PROMETHEUS_MULTIPROC_DIR={runtime}metrics" in unit["Environment"]
    # Heartbeat files are made in the default temp dir (ingestd/heartbeat.py), which
    # ProtectSystem=strict makes read-only unless it is private.
    if unit.get("ProtectSystem") == ["strict"]:
        assert unit.get("PrivateTmp") == ["yes"]
    # Forks, signals and prctl are in @system-service; the later lines only deny.
    filters = unit.get("SystemCallFilter", [])
    if filters:
        assert "@system-service" in filters[0].split()
        assert all(value.startswith("~") for value in filters[1:])
    # MemoryDenyWriteExecute=yes holds as long as ingestd makes no ctypes or cffi
    # callbacks (their closures may need writable and executable memory).
    if unit.get("MemoryDenyWriteExecute") == ["yes"]:
        callback = re.compile(r"\b(CFUNCTYPE|PYFUNCTYPE|WINFUNCTYPE)\b|\bffi\.callback\(")
        callbacks = [f"{path.relative_to(REPO)}:{n}"
                     for path in sorted((REPO / "ingestd").rglob("*.py"))
                     for n, line in enumerate(path.read_text().splitlines(), 1)
                     if callback.search(line)]
        assert not callbacks, f"ctypes/cffi callbacks under MemoryDenyWriteExecute=yes: {callbacks}"
