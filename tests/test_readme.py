"""The README's option table is the one the declarations generate."""

from __future__ import annotations

import re

from ingestd.config import options_table
from tests.stack import REPO


def test_readme_option_table_matches_declarations() -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- options:begin[^>]*-->\n(.*?)\n<!-- options:end -->", readme, re.S)
    assert block is not None, "README lost its options markers"
    assert block.group(1) == options_table(), (
        "README option table is stale; regenerate it with: "
        "python -c 'from ingestd.config import options_table; print(options_table())'")


def test_example_host_config_loads() -> None:
    from ingestd.config import load

    loaded = load(["--config", str(REPO / "deploy" / "ingestd.toml")], {})
    assert loaded.config.workers == 8 and loaded.sources["workers"] == "file"


def test_unit_file_drains_before_systemd_kills() -> None:
    unit = (REPO / "deploy" / "systemd" / "ingestd.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify"
    assert settings["KillMode"] == "mixed"
    assert "WatchdogSec" in settings and "EnvironmentFile" in settings
    from ingestd.config import Config

    assert float(settings["TimeoutStopSec"]) > Config().drain_timeout
