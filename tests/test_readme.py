"""The README's generated tables are the ones the declarations generate."""

from __future__ import annotations

import importlib
import re

import pytest

from ingestd import config
from tests.stack import REPO


def generated(name: str) -> str:
    """The README's block between ``<!-- name:begin ... -->`` and ``<!-- name:end -->``."""
    readme = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {name}:begin[^>]*-->\n(.*?)\n<!-- {name}:end -->", readme, re.S)
    assert block is not None, f"README lost its {name} markers"
    return block.group(1)


@pytest.mark.parametrize("table", ["options", "protected"])
def test_readme_tables_match_declarations(table: str) -> None:
    assert generated(table) == getattr(config, f"{table}_table")(), (
        f"README {table} table is stale; regenerate it with: "
        f"python -c 'from ingestd.config import {table}_table; print({table}_table())'")


@pytest.mark.parametrize("command", ["replay", "status"])
def test_readme_command_tables_match_their_parsers(command: str) -> None:
    parser = importlib.import_module(f"ingestd.tools.{command}").build_parser()
    assert generated(f"{command}-options") == config.command_table(parser), \
        f"README {command} table is stale"


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
