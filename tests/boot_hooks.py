"""``--schema`` targets that misbehave only inside a worker, for supervisor boot tests.

ingestd imports the schema module twice: once to check the configuration (in a
child of the supervisor's own), and again in each worker while it boots
(``Validator``, inside ``Worker()``), after the worker's signal handlers were
reset and before it beats or installs its own. A module-level ``__getattr__``
(PEP 562) answers both look-ups and tells them apart: only a worker has
imported ``ingestd.worker.loop`` by then.

- ``tests.boot_hooks:Crashing``: the worker dies at once (``os._exit(70)``),
  before it ever beats, without raising anything ingestd could catch;
- ``tests.boot_hooks:Slow``: the worker drops a marker file into
  ``$INGESTD_TEST_BOOT_MARKS`` (if set), then sleeps
  ``$INGESTD_TEST_BOOT_SLEEP`` seconds (default 5) before booting normally.

The configuration check always gets the plain :class:`Signal` Struct.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec


class Signal(msgspec.Struct):
    name: str
    value: float
    source: str
    timestamp: float | str


def __getattr__(name: str) -> Any:
    if name not in ("Crashing", "Slow"):
        raise AttributeError(name)
    if "ingestd.worker.loop" in sys.modules:  # in a worker, while it boots
        if name == "Crashing":
            os._exit(70)
        marks = os.environ.get("INGESTD_TEST_BOOT_MARKS")
        if marks:
            (Path(marks) / f"booting-{os.getpid()}").touch()
        time.sleep(float(os.environ.get("INGESTD_TEST_BOOT_SLEEP", "5")))
    return Signal
