"""Types of ``ingestd/_native.c`` (the hot path in C)."""

from collections.abc import Callable
from typing import Any

def argsrepr(raw: bytes, maxsize: int, /) -> bytes | None: ...
def encode_each(fragments: tuple[bytes, ...], slots: bytes, head: bytes, tail: bytes,
                maxsize: int, tasks: list[Any], tags: list[bytes],
                fallback: Callable[[Any], bytes], key: bytes | None, /) -> Any:
    """A list of envelopes; given a key, the LPUSH command (bytes)."""
