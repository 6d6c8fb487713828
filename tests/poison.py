"""``--schema`` targets whose validation misbehaves on chosen records, for the poison
tests. Each is the default signal schema plus a ``__post_init__`` that looks at the
record's ``name``:

- ``tests.poison:Raising``: ``name == "raise"`` raises RuntimeError, an exception
  msgspec does not turn into a validation error (a bug in a schema of one's own);
- ``tests.poison:Killing``: ``name == "kill"`` SIGKILLs the worker, as the OOM killer
  or a crash in C code would: nothing ingestd could catch;
- ``tests.poison:Spinning``: ``name == "spin"`` never returns, as a pathological
  input to a slow algorithm would: the worker stops beating.
"""

from __future__ import annotations

import os
import signal
import time

from ingestd.schema import Signal


class Raising(Signal):
    def __post_init__(self) -> None:
        if self.name == "raise":
            raise RuntimeError("the schema's own bug")


class Killing(Signal):
    def __post_init__(self) -> None:
        if self.name == "kill":
            os.kill(os.getpid(), signal.SIGKILL)


class Spinning(Signal):
    def __post_init__(self) -> None:
        while self.name == "spin":
            time.sleep(1)
