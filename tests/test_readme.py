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
